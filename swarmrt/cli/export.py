"""The ``swarmrt export`` subcommand: stage checkpoints -> the user's model (:mod:`swarmrt.models.export`)."""

from __future__ import annotations

import json


def cmd_export(args) -> int:
    from swarmrt.config import load_config
    from swarmrt.models.export import export_model

    result = export_model(load_config(args.config), args.checkpoints, args.out)
    print(json.dumps(result))
    return 0


def add_export_parser(sub) -> None:
    p = sub.add_parser("export", help="merge the stages' newest checkpoints into the model and write it "
                                      "(save_pretrained for Hugging Face models)")
    p.add_argument("--config", required=True, help="the run config the checkpoints were written under")
    p.add_argument("--checkpoints", required=True, metavar="DIR",
                   help="checkpoint location ([checkpoint] location of the run)")
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write the model to")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=cmd_export)
