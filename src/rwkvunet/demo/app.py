"""The Gradio page: upload, options, input and overlay side by side, legend, slice slider, download.

:func:`build_app` is what ``rwkvunet demo`` serves and what a Space's ``app.py`` calls; the work is done by
:class:`rwkvunet.demo.callbacks.DemoModel`, whose functions the page's events call.
"""
from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Optional, Union

from .. import inference_io as io
from .callbacks import INTENSITY_MODES, SIZE_MODES, DemoModel, Options, Result
from .examples import write_examples

INSTALL_HINT = 'the demo needs Gradio: pip install "rwkvunet[demo]"'


def require_gradio():
    """The gradio module, or ImportError saying how to install it."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing leaves the machine unasked
    try:
        import gradio
    except ImportError as err:
        raise ImportError(INSTALL_HINT) from err
    return gradio


def status_html(text: str, error: bool = False) -> str:
    """The status box: the summary's first line, then its notes; errors in red."""
    lines = [html.escape(line) for line in text.splitlines() if line.strip()]
    if error:
        return f'<div class="rwkvunet-error" style="color:#b00020"><b>Error:</b> {"<br>".join(lines)}</div>'
    return f'<div class="rwkvunet-status">{"<br>".join(lines)}</div>'


def build_app(model: Union[str, os.PathLike, DemoModel], *, device=None, dtype=None, batch_size: int = 8,
              title: Optional[str] = None):
    """A ``gradio.Blocks`` page for a model folder, Hub id or :class:`DemoModel`; call ``.launch()`` on it."""
    gr = require_gradio()
    demo = model if isinstance(model, DemoModel) else DemoModel.from_pretrained(
        model, device=device, dtype=dtype, batch_size=batch_size)
    title = title or f"RWKV-UNet: {Path(str(demo.name)).name if os.path.isdir(str(demo.name)) else demo.name}"
    examples = write_examples(demo.workdir / "examples")

    def segment(path, tta, size, tile, overlap, intensity, low, high, axis, alpha):
        hidden = gr.update(visible=False, value=0)
        if not path:
            return None, None, None, hidden, demo.legend_html(), None, status_html(
                "Upload an image or a NIfTI volume, or pick an example.")
        default = Options()  # an emptied number field takes the default
        options = Options(tta=bool(tta), size=size, intensity=intensity, axis=int(axis),
                          tile=int(default.tile if tile is None else tile),
                          overlap=int(default.overlap if overlap is None else overlap),
                          window=(float(default.window[0] if low is None else low),
                                  float(default.window[1] if high is None else high)))
        result, message = demo.handle(path, options)
        if result is not None:
            index = result.default_slice()
            slider = gr.update(visible=result.kind == "volume", minimum=0, maximum=max(result.num_slices - 1, 1),
                               value=index, label=f"slice along axis {result.axis} (of {result.num_slices})")
            return (result, *demo.views(result, index, alpha), slider, demo.legend_html(result),
                    str(result.download), status_html(f"{Path(path).name}: {result.summary}"))
        return None, None, None, hidden, demo.legend_html(), None, status_html(message, error=True)

    def redraw(result: Optional[Result], index, alpha):
        if result is None:
            return gr.update(), gr.update()
        return demo.views(result, int(index or 0), alpha)

    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(3600, 3600)) as blocks:
        gr.Markdown(f"# {html.escape(title)}\n{demo.description()}. Upload an image "
                    f"({', '.join(io.IMAGE_EXTENSIONS)}) or a NIfTI volume (.nii, .nii.gz), or pick an example; "
                    "the labels are those `rwkvunet predict` writes.")
        result_state = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(label="Image or NIfTI volume", type="filepath", elem_id="upload")
                gr.Examples(examples=[[str(p)] for p in examples], inputs=[upload],
                            label="Examples (synthetic, made on the fly)")
                with gr.Accordion("Options", open=True):
                    tta = gr.Checkbox(value=False, label="test-time augmentation: average over flips (--tta)",
                                      elem_id="tta")
                    size = gr.Radio(list(SIZE_MODES), value="default", label="image size", elem_id="size")
                    with gr.Row():
                        tile = gr.Number(value=512, precision=0, minimum=16, label="tile (px)")
                        overlap = gr.Number(value=64, precision=0, minimum=0, label="overlap (px)")
                    intensity = gr.Radio(list(INTENSITY_MODES), value="auto", label="volume intensities",
                                         elem_id="intensity")
                    with gr.Row():
                        low = gr.Number(value=Options.window[0], label="window low")
                        high = gr.Number(value=Options.window[1], label="window high")
                    axis = gr.Radio([("0", 0), ("1", 1), ("2 (axial for RAS scans)", 2)], value=2,
                                    label="slice axis of volumes (--axis)", elem_id="axis")
                run = gr.Button("Segment", variant="primary", elem_id="run")
            with gr.Column(scale=2):
                status = gr.HTML(status_html("Upload an image or a NIfTI volume, or pick an example."),
                                 elem_id="status")
                with gr.Row():
                    input_view = gr.Image(label="input", type="numpy", format="png", interactive=False,
                                          height=400, elem_id="input-view")
                    overlay_view = gr.Image(label="segmentation", type="numpy", format="png", interactive=False,
                                            height=400, elem_id="overlay-view")
                alpha = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="overlay opacity", elem_id="opacity")
                slice_index = gr.Slider(0, 1, value=0, step=1, label="slice", visible=False, elem_id="slice")
                legend = gr.HTML(demo.legend_html(), elem_id="legend")
                download = gr.File(label="labels (PNG for images, NIfTI with the input's affine for volumes)",
                                   interactive=False, elem_id="download")

        inputs = [upload, tta, size, tile, overlap, intensity, low, high, axis, alpha]
        outputs = [result_state, input_view, overlay_view, slice_index, legend, download, status]
        upload.change(segment, inputs, outputs)
        run.click(segment, inputs, outputs)
        for control in (alpha, slice_index):
            control.change(redraw, [result_state, slice_index, alpha], [input_view, overlay_view],
                           show_progress="hidden")
    blocks.rwkvunet_model = demo  # the DemoModel behind the page, for programs that build on it
    return blocks


__all__ = ["INSTALL_HINT", "build_app", "require_gradio", "status_html"]
