"""``axlora`` command line: one table from subcommand to function; bad input becomes exit status 2.

Everything after the config path that looks like ``--key value`` overrides the YAML and is type-checked
with it. Only this module turns errors into messages and exit codes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
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
    "inference": """examples:
  axlora inference my.yml --prompt "What is LoRA?"            # the run's final/ adapter, greedy
  axlora inference my.yml --prompts questions.jsonl --output answers.jsonl
  axlora inference my.yml --merged --system "Be brief."       # the merged model; a chat on a terminal
  axlora inference examples/yaml/tiny-demo.yml --prompt '{"instruction": "Add the two numbers.", "input": "12+35"}'""",
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
    if config.pretraining_dataset:  # streamed while training: nothing is prepared; check that it reads
        from axlora.data.pretraining_pack import check_corpus
        from axlora.model.tokenizer import load_tokenizer

        check_corpus(config, load_tokenizer(config))
        return 0
    from axlora.data.prepare import check_datasets, prepare_data

    check_datasets(config)  # a missing or unreadable data file fails before the tokenizer loads
    from axlora.model.tokenizer import load_tokenizer, tokenizer_fingerprint

    tokenizer = load_tokenizer(config)
    if config.rl:  # preference rows are read and checked here, and kept in memory by each run (no cache entry)
        from axlora.data.preference_prepare import prepare_preferences

        prepare_preferences(config, tokenizer)
        return 0
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


def cmd_inference(args: argparse.Namespace, overrides: list[str]) -> int:
    from pathlib import Path

    from axlora.config.load import load_config

    config = load_config(args.config, overrides)
    from axlora.inference.options import InferenceOptions
    from axlora.inference.run import run_inference
    from axlora.model.generate import Sampling

    sampling = Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                        top_k=args.top_k, repetition_penalty=args.repetition_penalty)
    options = InferenceOptions(
        prompts=args.prompt or [], prompts_file=Path(args.prompts) if args.prompts else None, output=args.output,
        system=args.system, lora_model_dir=Path(args.lora_model_dir) if args.lora_model_dir else None,
        merged=args.merged, sampling=sampling, seed=args.seed, batch_size=args.batch_size, gradio=args.gradio,
    )
    run_inference(config, options)
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
    "inference": (cmd_inference, "answer prompts or chat with the trained model, in the run's format"),
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
        if name == "inference":
            add_inference_arguments(command)
    return parser


def add_inference_arguments(command: argparse.ArgumentParser) -> None:
    source = command.add_argument_group("model")
    source.add_argument("--lora_model_dir", "--lora-model-dir", dest="lora_model_dir",
                        help="adapter to load (default: output_dir/final, else the config's lora_model_dir)")
    source.add_argument("--merged", action="store_true", help="load the merged model in output_dir/merged")
    prompts = command.add_argument_group("prompts (default: a chat on a terminal, else one prompt per line of stdin)")
    prompts.add_argument("--prompt", action="append", metavar="TEXT",
                         help="a prompt (repeatable); a JSON object gives the format's fields, e.g. instruction, input")
    prompts.add_argument("--prompts", metavar="FILE.jsonl", help="JSON lines with 'prompt' or 'messages'")
    prompts.add_argument("--output", metavar="FILE.jsonl",
                         help="write one JSON line per prompt with its response ('-': standard output)")
    prompts.add_argument("--system", metavar="TEXT", help="system message of a chat run's conversations")
    prompts.add_argument("--gradio", action="store_true", help="a web chat (needs: pip install 'axlora[gradio]')")
    sampling = command.add_argument_group("generation (greedy unless --temperature is above 0)")
    sampling.add_argument("--max-new-tokens", type=int, default=256, help="default: 256")
    sampling.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy, reproducible")
    sampling.add_argument("--top-p", type=float, help="nucleus sampling (with --temperature)")
    sampling.add_argument("--top-k", type=int, help="sample among the k likeliest tokens (with --temperature)")
    sampling.add_argument("--repetition-penalty", type=float, help="above 1 discourages repeats")
    sampling.add_argument("--seed", type=int, help="sampling seed (default: the config's seed)")
    sampling.add_argument("--batch-size", type=int, default=8, help="prompts generated together (default: 8)")


# Deprecation notices libraries raise about their own calls (peft -> transformers, DeepSpeed -> torch):
# nothing a user can act on, printed on every run.
_LIBRARY_NOTICES = ("`is_gradient_checkpointing` is deprecated", "`torch.distributed.all_gather_into_tensor` is deprecated")
# Loggers that report, on import, kernels this machine lacks (torchao's CUDA builds, bitsandbytes' Hub kernels)
# and torch.compile registrations: printed by every run in which peft imports them; their errors still show.
_IMPORT_CHATTER = ("torchao", "torch.utils._pytree", "bitsandbytes")


def main(argv: Sequence[str] | None = None) -> int:
    for notice in _LIBRARY_NOTICES:
        warnings.filterwarnings("ignore", message=notice, category=FutureWarning)
    for name in _IMPORT_CHATTER:
        logging.getLogger(name).setLevel(logging.ERROR)
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
    except BrokenPipeError:  # the reader of our output left (`axlora validate cfg.yml | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush cannot fail again
        return 128 + signal.SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
