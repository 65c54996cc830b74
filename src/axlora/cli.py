"""``axlora`` command line: one table from subcommand to function; bad input becomes exit status 2.

Everything after the config path that looks like ``--key value`` overrides the YAML and is type-checked
with it. Only this module turns errors into messages and exit codes.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Callable, Sequence

from axlora import __version__
from axlora.core.errors import RunFailed, UserError
from axlora.core.interrupt import RunInterrupted

EXAMPLES = {
    "train": """examples:
  axlora train examples/yaml/tiny-demo.yml
  axlora train my.yml --learning_rate 1e-4 --max_steps 200
  axlora train my.yml --lora_model_dir outputs/round1   # continue an earlier run's adapter
  axlora train my.yml --resume_from_checkpoint auto       # resume an interrupted run exactly""",
    "preprocess": """examples:
  axlora preprocess examples/yaml/tiny-demo.yml
  axlora preprocess my.yml --sequence_len 4096""",
    "merge-lora": """examples:
  axlora merge-lora my.yml                               # merges output_dir/final into output_dir/merged
  axlora merge-lora my.yml --lora-model-dir outputs/round1/final --output /models/merged""",
    "validate": """examples:
  axlora validate my.yml
  axlora validate my.yml --micro_batch_size 4""",
    "schema": """examples:
  axlora schema > axlora.schema.json""",
}


def cmd_train(args: argparse.Namespace, overrides: list[str]) -> int:
    from pathlib import Path

    from axlora.config.load import load_config

    config = load_config(args.config, overrides)
    from axlora.launch import train

    return train(config, Path(args.config), overrides)


def cmd_preprocess(args: argparse.Namespace, overrides: list[str]) -> int:
    from axlora.config.load import load_config

    config = load_config(args.config, overrides)
    from axlora.data.prepare import check_datasets, prepare_data

    check_datasets(config)  # a missing or unreadable data file fails before the tokenizer loads
    from axlora.model.tokenizer import load_tokenizer, tokenizer_fingerprint

    tokenizer = load_tokenizer(config)
    prepared = prepare_data(config, tokenizer, tokenizer_fingerprint(tokenizer))
    print(f"data: report {prepared.cache_dir / 'report.json'}, length histogram {prepared.cache_dir / 'lengths.png'}")
    return 0


def cmd_merge(args: argparse.Namespace, overrides: list[str]) -> int:
    from axlora.config.load import load_config

    config = load_config(args.config, overrides)
    from axlora.merge_command import run_merge

    run_merge(config, lora_model_dir=args.lora_model_dir, output=args.output, dtype=args.dtype,
              verify=not args.no_verify)
    return 0


def cmd_validate(args: argparse.Namespace, overrides: list[str]) -> int:
    from axlora.config.load import load_config
    from axlora.validate import describe_plan

    config = load_config(args.config, overrides)
    print(describe_plan(config))
    return 0


def cmd_schema(args: argparse.Namespace, overrides: list[str]) -> int:
    from axlora.config.schema import json_schema

    if overrides:
        raise UserError(f"schema takes no overrides, got {' '.join(overrides)}")
    print(json.dumps(json_schema(), indent=2))
    return 0


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace, list[str]], int], str]] = {
    "train": (cmd_train, "train a LoRA (prepares the data first when needed)"),
    "preprocess": (cmd_preprocess, "tokenize and cache the datasets, print a report"),
    "merge-lora": (cmd_merge, "merge the trained adapter into the base model"),
    "validate": (cmd_validate, "check a config and print the plan (fast, no torch)"),
    "schema": (cmd_schema, "print the config's JSON Schema"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="axlora",
        description="YAML-config-driven LoRA fine-tuning. Any --key value after the config overrides the YAML.",
        epilog="examples:\n  axlora train examples/yaml/tiny-demo.yml\n  axlora validate my.yml --lora_r 16\n"
        "  axlora <command> --help",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"axlora {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text) in COMMANDS.items():
        command = sub.add_parser(
            name, help=help_text, description=help_text, epilog=EXAMPLES[name],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if name != "schema":
            command.add_argument("config", help="YAML config file")
        if name == "merge-lora":
            command.add_argument("--lora-model-dir", help="adapter to merge (default: output_dir/final, "
                                 "else lora_model_dir)")
            command.add_argument("--output", help="where to write the merged model (default: output_dir/merged)")
            command.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                                 help="dtype of the merged weights (default: the base model's)")
            command.add_argument("--no-verify", action="store_true", help="skip the streamed self-check")
    return parser


# Deprecation notices libraries raise about their own calls (peft -> transformers, DeepSpeed -> torch):
# nothing a user can act on, printed on every run.
_LIBRARY_NOTICES = ("`is_gradient_checkpointing` is deprecated", "`torch.distributed.all_gather_into_tensor` is deprecated")


def main(argv: Sequence[str] | None = None) -> int:
    for notice in _LIBRARY_NOTICES:
        warnings.filterwarnings("ignore", message=notice, category=FutureWarning)
    parser = build_parser()
    args, overrides = parser.parse_known_args(argv)
    handler = COMMANDS[args.command][0]
    try:
        return handler(args, overrides)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except RunFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except RunInterrupted as exc:
        print(str(exc), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("aborted: interrupted at once; the work since the last checkpoint is lost", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
