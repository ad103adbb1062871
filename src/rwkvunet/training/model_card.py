"""The README.md model card of a fine-tuned segmenter: what it is, how it was trained, what it scored."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import yaml

from ..hub import AUTHORS_URL

PAPER = "https://arxiv.org/abs/2501.08458"


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def write_model_card(folder, *, args: dict, test: Optional[dict], validation_best: Optional[float],
                     steps: int, epochs: int, num_parameters: int, train_seconds: float,
                     repo_id: Optional[str] = None) -> Path:
    """Write ``folder/README.md`` with Hub metadata, the measured test scores and the training options."""
    variant = str(args.get("variant", "t")).upper()
    model = args.get("model", "rwkvunet")
    title = f"RWKV-UNet-{variant} fine-tuned" if model == "rwkvunet" else f"Reference {model}"
    dataset = str(args.get("dataset"))
    meta = {
        "library_name": "transformers",
        "pipeline_tag": "image-segmentation",
        "tags": ["rwkvunet", "rwkv", "medical-imaging", "semantic-segmentation"],
    }
    if args.get("pretrained") or args.get("encoder_pretrained"):
        # started from others' weights (e.g. the authors', which have no published licence): claim none
        meta.update(license="other", license_name="unknown", license_link=AUTHORS_URL)
    if dataset != "synthetic" and not Path(dataset).exists():
        meta["datasets"] = [dataset]
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
             f"# {title} trained on {dataset}", "",
             f"RWKV-UNet ([paper]({PAPER})) segmenter with {num_parameters / 1e6:.2f} M parameters, trained for "
             f"{steps} steps ({epochs} epochs, {train_seconds / 60:.1f} min).", "",
             "```python", "import rwkvunet  # registers the model with transformers",
             "from transformers import AutoModelForSemanticSegmentation, AutoImageProcessor",
             f'model = AutoModelForSemanticSegmentation.from_pretrained("{repo_id or Path(folder).name}")',
             f'processor = AutoImageProcessor.from_pretrained("{repo_id or Path(folder).name}")',
             "```", ""]
    lines += ["## Test results", ""]
    if test:
        second = "IoU" if test.get("binary") else "HD95"
        key = "iou" if test.get("binary") else "hd95"
        lines += [f"{test.get('num_cases', 0)} test cases"
                  + (" with flip test-time augmentation" if args.get("tta") else "") + ".", "",
                  f"| class | Dice | {second} |", "|---|---|---|"]
        for row in test.get("per_class", []):
            lines.append(f"| {row['class']} | {_fmt(row['dice'])} | {_fmt(row.get(key))} |")
        overall = test.get("mean_iou") if test.get("binary") else test.get("mean_hd95")
        lines += [f"| **mean** | **{_fmt(test.get('mean_dice'))}** | **{_fmt(overall)}** |", ""]
    else:
        lines += ["No test split was available.", ""]
    if validation_best is not None and validation_best >= 0:
        lines += [f"Best validation mean Dice: {validation_best:.4f}.", ""]
    shown = {k: v for k, v in args.items() if v is not None and k not in ("resume", "output_dir")}
    lines += ["## Training options", "", "```yaml", yaml.safe_dump(shown, sort_keys=False).strip(), "```", "",
              "## Citation", "", "```bibtex",
              "@article{jiang2025rwkvunet,",
              "  title={RWKV-UNet: Improving UNet with Long-Range Cooperation for Effective Medical Image "
              "Segmentation},",
              "  author={Jiang, Juntao and Zhang, Jiangning and Liu, Weixuan and Gao, Muxuan and Hu, Xiaobin "
              "and Yan, Xiaoxiao and Huang, Feiyue and Liu, Yong},",
              "  journal={arXiv preprint arXiv:2501.08458},", "  year={2025}", "}", "```", ""]
    path = Path(folder) / "README.md"
    path.write_text("\n".join(lines))
    return path
