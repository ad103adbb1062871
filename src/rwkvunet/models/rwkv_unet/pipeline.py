"""``pipeline("image-segmentation")`` for RWKV-UNet models, binary ones included.

transformers' pipeline names each value of the label map by ``config.id2label[value]``. A binary RWKV-UNet
(``num_labels=1``, one sigmoid logit, as six of the paper's eight data sets are) has one entry there, its
foreground, while its label maps hold 0 (background) and 1 (foreground): the stock pipeline fails with
``KeyError: 1`` (or would call background by the foreground's name). It also checks models against
transformers' built-in lists only, and logs an error for every model registered from outside. The pipeline
below names the values of a binary model's maps ``background`` and its foreground label, accepts registered
RWKV-UNet models, and leaves every other model to transformers' own code.
"""
from __future__ import annotations

import numpy as np
from transformers.pipelines.image_segmentation import ImageSegmentationPipeline

_TASK = "image-segmentation"
_STOCK_IMPL = "transformers.pipelines.image_segmentation.ImageSegmentationPipeline"


def _is_rwkv_unet(model) -> bool:
    return getattr(getattr(model, "config", None), "model_type", None) == "rwkv_unet"


def label_names(config) -> dict:
    """Name of each value in the label maps; a one-logit model's maps hold 0 (background) and 1 (its label)."""
    names = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
    if int(config.num_labels) == 1:
        return {0: "background", 1: names.get(0, "foreground")}
    return {i: names.get(i, f"LABEL_{i}") for i in range(int(config.num_labels))}


class RWKVUNetImageSegmentationPipeline(ImageSegmentationPipeline):
    """transformers' image segmentation pipeline, with RWKV-UNet's binary models named correctly."""

    def check_model_type(self, supported_models):
        if _is_rwkv_unet(self.model):
            return
        super().check_model_type(supported_models)

    def postprocess(self, model_outputs, subtask=None, threshold=0.9, mask_threshold=0.5,
                    overlap_mask_area_threshold=0.5):
        if not _is_rwkv_unet(self.model) or subtask not in (None, "semantic"):
            return super().postprocess(model_outputs, subtask=subtask, threshold=threshold,
                                       mask_threshold=mask_threshold,
                                       overlap_mask_area_threshold=overlap_mask_area_threshold)
        from PIL import Image

        segmentation = self.image_processor.post_process_semantic_segmentation(
            model_outputs, target_sizes=model_outputs["target_size"])[0].numpy()
        names = label_names(self.model.config)
        return [{"score": None, "label": names[int(value)],
                 "mask": Image.fromarray(((segmentation == value) * 255).astype(np.uint8), mode="L")}
                for value in np.unique(segmentation)]


def register_pipeline() -> None:
    """Serve ``pipeline("image-segmentation")`` with the class above, unless another package replaced it."""
    from transformers.pipelines import PIPELINE_REGISTRY

    task = PIPELINE_REGISTRY.supported_tasks.get(_TASK)
    if task is None:
        return
    impl = task.get("impl")
    if impl in (_STOCK_IMPL, ImageSegmentationPipeline):
        task["impl"] = RWKVUNetImageSegmentationPipeline


__all__ = ["RWKVUNetImageSegmentationPipeline", "label_names", "register_pipeline"]
