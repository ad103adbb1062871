"""A web page for a segmentation model: ``rwkvunet demo MODEL`` serves it, ``--write-space`` publishes it.

:func:`build_app` builds the Gradio page (the ``demo`` extra; Gradio is imported only then) around
:class:`DemoModel`, whose callbacks segment by the calls ``rwkvunet predict`` makes; :func:`write_space` writes a
Hugging Face Space that runs the same page.
"""
from .app import build_app
from .callbacks import DemoModel, Options, Result
from .space import push_space, write_space

__all__ = ["DemoModel", "Options", "Result", "build_app", "push_space", "write_space"]
