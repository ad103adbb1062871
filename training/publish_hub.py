"""Assemble a publishable Hub folder from an authors' checkpoint and its hub_configs/<repo> folder, and push it.

    python training/publish_hub.py synapse_b.pth hub_configs/rwkvunet-b-synapse --out build/rwkvunet-b-synapse
    python training/publish_hub.py enc_b.pth hub_configs/rwkvunet_enc_b.in1k --push        # needs network + token

Segmenters get their weights, config, image processor config, model card and the model code (auto_map, so the
repo also loads with trust_remote_code=True); encoders become timm Hub folders with their card. The repo id is
``rwkvunet.hub.HUB_ORG/<hub config folder name>`` unless --repo-id says otherwise. Without --push nothing
leaves the machine.

The weights are the authors' and their repository publishes no licence for them: a card whose metadata
claims a licence for them (anything but ``license: other`` with ``license_name: unknown``) is refused, and
uploading them at all is redistribution, which needs the authors' permission.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rwkvunet.commands import convert
from rwkvunet.errors import UserError
from rwkvunet.hub import AUTHORS_URL, WEIGHTS_LICENSE


def is_encoder_config(hub_config: Path) -> bool:
    """timm Hub configs name an ``architecture``; transformers configs a ``model_type``."""
    return "architecture" in json.loads((hub_config / "config.json").read_text(encoding="utf-8"))


def check_card_licence(hub_config: Path) -> None:
    """Refuse a model card that claims a licence for the authors' weights, which have none published."""
    from huggingface_hub import ModelCard

    card = hub_config / "README.md"
    if not card.is_file():
        raise UserError(f"{hub_config} has no README.md; every release needs its model card")
    data = ModelCard.load(card).data
    found = (data.license, data.get("license_name"), data.get("license_link"))
    if found != ("other", WEIGHTS_LICENSE, AUTHORS_URL):
        raise UserError(f"{card} says license {found[0]!r} (license_name {found[1]!r}, license_link {found[2]!r}) "
                        f"but the authors publish no licence for these weights; use license: other, "
                        f"license_name: {WEIGHTS_LICENSE}, license_link: {AUTHORS_URL}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="publish_hub.py", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="the authors' checkpoint (.pth / .safetensors)")
    parser.add_argument("hub_config", type=Path, help="hub_configs/<repo> folder")
    parser.add_argument("--out", type=Path, help="folder to assemble (default: build/<repo>)")
    parser.add_argument("--push", action="store_true", help="upload with huggingface_hub (needs network and a token)")
    parser.add_argument("--repo-id", help="Hub repo (default: HUB_ORG/<hub config folder name>)")
    parser.add_argument("--private", action="store_true", help="create the Hub repo of --push as private")
    parser.add_argument("--prefix", default="", help="only use checkpoint keys under this prefix")
    parser.add_argument("--overwrite", "--force", dest="overwrite", action="store_true",
                        help="assemble into a folder that is not empty (the files it writes are replaced, others kept)")
    args = parser.parse_args(argv)

    if args.private and not args.push:  # it was silently ignored
        parser.error("--private creates the Hub repo of --push as private, and nothing is pushed; add --push or drop "
                     "--private")
    hub_config = args.hub_config.resolve()
    if not (hub_config / "config.json").is_file():
        parser.error(f"{hub_config} has no config.json; pass a hub_configs/<repo> folder")
    check_card_licence(hub_config)
    out = args.out or Path("build") / hub_config.name
    encoder = is_encoder_config(hub_config)
    variant = json.loads((hub_config / "config.json").read_text(encoding="utf-8"))
    variant = variant["architecture"][-1] if encoder else variant["variant"]
    cli = [str(args.checkpoint), str(out), "--variant", variant, "--hub-config", str(hub_config)]
    cli += ["--encoder"] if encoder else ["--with-code"]
    if args.prefix:
        cli += ["--prefix", args.prefix]
    if args.overwrite:
        cli += ["--overwrite"]
    if args.push:
        cli += ["--publish", convert.hub_repo_id(str(hub_config), args.repo_id)]
        if args.private:
            cli += ["--private"]
    return convert.main(cli, prog=parser.prog)


if __name__ == "__main__":
    from rwkvunet.errors import run_main

    sys.exit(run_main("publish_hub.py", main))  # one-line errors; RWKVUNET_DEBUG=1 for tracebacks
