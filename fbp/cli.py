"""The ``fbp`` command: ``fbp train`` trains a network with fbp's own gradients."""

from __future__ import annotations

import argparse
import functools
import itertools
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

import jax
import jax.numpy as jnp
import optax

from fbp import data, losses, models, nn, optim
from fbp.checkpoint import load_checkpoint, prepare_directory
from fbp.errors import FbpError
from fbp.nn import catalogue
from fbp.train import CHECKPOINT_NAME, GPT_CHECKPOINT_NAME, fit, fit_text, gpt_optimizer

ACTIVATIONS = models.ACTIVATIONS
OPTIMIZERS = {
    "sgd": optim.sgd,
    "momentum": optim.momentum,
    "adagrad": optim.adagrad,
    "rmsprop": optim.rmsprop,
    "adam": optim.adam,
    "adamw": optim.adamw,
}
LEARNING_RATES = {
    "sgd": 0.1,
    "momentum": 0.01,
    "adagrad": 0.05,
    "rmsprop": 1e-3,
    "adam": 1e-3,
    "adamw": 1e-3,
}
"""Each optimizer's default ``--learning-rate`` (96.7-98.1% on digits with the other defaults)."""

TRAIN_EXAMPLES = """\
examples:
  fbp train                                   # 64-256-10 ReLU net on digits, Adam: ~98% in seconds
  fbp train --check                           # verify the gradients on one batch first
  fbp train --hidden 128,64 --optimizer momentum --seed 1
  fbp train --optimizer sgd --learning-rate 0.1 --activation tanh --epochs 60
  fbp train --dataset mnist1d --hidden 100,100 --epochs 200 --batch-size 100 --learning-rate 1e-2
  fbp train --dataset mnist1d --model cnn --epochs 150 --batch-size 100 --learning-rate 2e-2 \\
            --schedule tail
  fbp train --dataset mnist1d --model gru --epochs 150 --batch-size 100 --learning-rate 1e-2
  fbp train --dataset mnist5k --hidden 30 --activation sigmoid \\
            --optimizer sgd --learning-rate 0.5 --batch-size 10 --epochs 30   # Nielsen's network
  fbp train --checkpoint-dir runs/a           # interrupt it, run it again: it resumes
  fbp train --model gpt --checkpoint-dir runs/gpt   # nanoGPT's CPU baby GPT on Python's stdlib
  fbp train --model gpt --text input.txt --iters 5000   # on your own text file
  fbp sample --checkpoint-dir runs/gpt --prompt "def "
"""

GPT_DEFAULTS = {"batch_size": 12, "learning_rate": 1e-3}
"""nanoGPT's CPU "baby GPT" (its README): batch 12, AdamW 1e-3 (warm-up 100, cosine to 1e-4)."""


def build_mlp(hidden: Sequence[int], num_classes: int, activation: str) -> nn.Layer:
    """Former name of :func:`fbp.models.mlp` (kept for one release; use that)."""
    return models.mlp(tuple(hidden), num_classes, activation)


build_cnn1d = models.mnist1d_cnn
"""Former name of :func:`fbp.models.mnist1d_cnn` (kept for one release; use that)."""

build_gru = models.mnist1d_gru
"""Former name of :func:`fbp.models.mnist1d_gru` (kept for one release; use that)."""


def _widths(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None
    if any(w < 1 for w in widths):
        raise argparse.ArgumentTypeError(f"widths must be positive, got {text!r}")
    return widths


def _int_in(low: int, high: int | None, what: str) -> Callable[[str], int]:
    """An argparse type: an int in ``[low, high)``, else a one-line usage error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int, got {text!r}") from None
        if value < low or (high is not None and value >= high):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    return parse


def _learning_rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(
            f"must be a finite number > 0, got {text} (a negative step size climbs the loss)"
        )
    return value


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (and exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fbp", description="Functional backpropagation in JAX: hand-derived, verified, fast."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser(
        "train",
        help="train a dense network with fbp's hand-derived gradients",
        epilog=TRAIN_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("--dataset", choices=sorted(data.DATASETS), default="digits")
    train.add_argument(
        "--model",
        choices=("mlp", "cnn", "gru", "gpt"),
        default="mlp",
        help="mlp: dense layers of --hidden widths; cnn: the mnist1d paper's 3-layer conv1d "
        "net; gru: its bidirectional GRU (hidden 6); gpt: a character-level GPT on --text "
        "(nanoGPT's CPU baby GPT: --layers 4 --heads 4 --width 128 --context 64, batch 12, "
        "AdamW with warm-up and cosine decay; --dataset, --optimizer, --schedule and "
        "--epochs do not apply) (default: mlp)",
    )
    train.add_argument("--hidden", type=_widths, default=(256,), help="hidden widths, e.g. 128,64")
    train.add_argument("--activation", choices=sorted(ACTIVATIONS), default="relu")
    train.add_argument("--optimizer", choices=list(OPTIMIZERS), default="adam")
    train.add_argument(
        "--learning-rate",
        type=_learning_rate,
        default=None,
        help="step size (default per optimizer: "
        + ", ".join(f"{name} {lr:g}" for name, lr in LEARNING_RATES.items())
        + ")",
    )
    train.add_argument(
        "--schedule",
        choices=("constant", "cosine", "tail"),
        default="constant",
        help="learning-rate schedule: constant; cosine decay to 0 over the run; or tail: "
        "constant, then linear decay to 0 over the last 10%% of the steps",
    )
    train.add_argument("--epochs", type=_int_in(0, None, "an int >= 0"), default=40)
    train.add_argument(
        "--batch-size",
        type=_int_in(1, None, "an int >= 1"),
        default=None,
        help="examples per step (default: 32; 12 windows for --model gpt)",
    )
    gpt = train.add_argument_group("--model gpt")
    gpt.add_argument(
        "--text",
        type=Path,
        default=None,
        help="a UTF-8 text file (default: Python's standard library source, about 1 MB)",
    )
    gpt.add_argument("--iters", type=_int_in(1, None, "an int >= 1"), default=2000)
    gpt.add_argument("--context", type=_int_in(1, None, "an int >= 1"), default=64)
    gpt.add_argument("--layers", type=_int_in(1, None, "an int >= 1"), default=4)
    gpt.add_argument("--heads", type=_int_in(1, None, "an int >= 1"), default=4)
    gpt.add_argument("--width", type=_int_in(1, None, "an int >= 1"), default=128)
    gpt.add_argument(
        "--eval-every",
        type=_int_in(1, None, "an int >= 1"),
        default=250,
        help="iterations between validation losses and checkpoints (default: 250)",
    )
    gpt.add_argument(
        "--sample-length",
        type=_int_in(0, None, "an int >= 0"),
        default=300,
        help="characters to sample at the end (default: 300)",
    )
    train.add_argument("--seed", type=_int_in(-(2**63), 2**63, "a 64-bit signed int"), default=0)
    train.add_argument(
        "--checkpoint-dir",
        type=Path,
        default=None,
        help=f"save {CHECKPOINT_NAME} there after every epoch; resume from it if present",
    )
    train.add_argument(
        "--check",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="verify the hand-derived gradients on one batch first and print the table",
    )
    train.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    check = commands.add_parser(
        "check",
        help="verify every built-in layer's backward and a sample model; exit 1 on any failure",
        description="Check each built-in layer with fbp.verify.check_layer and a sample "
        "model with fbp.verify.check_model (float64, jax.vjp and finite differences).",
    )
    check.add_argument("--seed", type=int, default=0)
    check.add_argument("--quiet", action="store_true", help="print one line per check")
    sample = commands.add_parser(
        "sample",
        help="generate text from a GPT trained by fbp train --model gpt",
        description="Load the GPT checkpoint in --checkpoint-dir (its vocabulary and settings "
        "are saved in it) and sample characters after --prompt.",
    )
    sample.add_argument("--checkpoint-dir", type=Path, required=True)
    sample.add_argument("--prompt", default="\n", help="the text to continue (default: a newline)")
    sample.add_argument("--length", type=_int_in(1, None, "an int >= 1"), default=300)
    sample.add_argument("--temperature", type=_learning_rate, default=0.8)
    sample.add_argument("--top-k", type=_int_in(1, None, "an int >= 1"), default=200)
    sample.add_argument("--seed", type=_int_in(-(2**63), 2**63, "a 64-bit signed int"), default=0)
    return parser


def _check_gradients(model: nn.Layer, dataset: data.Dataset, key: jax.Array, batch: int) -> bool:
    """``--check``: verify the gradients at fit's initial params on one batch; print the table."""
    from fbp import verify

    params, _ = model.init(jax.random.split(key)[0], dataset.input_shape)  # as fit draws them
    size = min(batch, 32)
    report = verify.check_model(
        model,
        losses.softmax_cross_entropy,
        params,
        dataset.x_train[:size],
        dataset.y_train[:size],
    )
    print(report)
    return bool(report.ok)


@functools.lru_cache(maxsize=8)
def _network(kind: str, hidden: tuple[int, ...], num_classes: int, activation: str) -> nn.Layer:
    """The ``--model`` network; the same object for the same settings.

    :func:`fbp.train.fit` compiles its epoch once per model and optimizer
    object, so a second ``fbp train`` in one process (``main`` called from a
    notebook or a test) with the same settings reuses the compiled program.
    Layers are pure values: sharing one is never visible otherwise.
    """
    if kind == "cnn":
        return models.mnist1d_cnn(num_classes)
    if kind == "gru":
        return models.mnist1d_gru(num_classes)
    return models.mlp(hidden, num_classes, activation)


@functools.lru_cache(maxsize=8)
def _optimizer(name: str, learning_rate: float, schedule: str, steps: int):
    """``--optimizer`` at ``--learning-rate`` with ``--schedule`` over ``steps`` steps; the
    same object for the same settings (as :func:`_network`, for fit's compiled epoch)."""
    return OPTIMIZERS[name](learning_rate_schedule(schedule, learning_rate, steps))


def _build_model(args: argparse.Namespace, dataset: data.Dataset) -> tuple[nn.Layer, str]:
    """The ``--model`` network for ``dataset``, and a one-line description of it."""
    mlp = args.model == "mlp"
    model = _network(
        args.model,
        tuple(args.hidden) if mlp else (),
        dataset.num_classes,
        args.activation if mlp else "",
    )
    if args.model == "cnn":
        what = "conv1d 3×25 channels (mnist1d CNN)"
    elif args.model == "gru":
        what = "bidirectional GRU, hidden 6 (mnist1d GRU)"
    else:
        sizes = (math.prod(dataset.input_shape), *args.hidden, dataset.num_classes)
        return model, f"dense {'-'.join(map(str, sizes))}, {args.activation}"
    params, _ = jax.eval_shape(lambda: model.init(jax.random.key(0), dataset.input_shape))
    count = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))
    return model, f"{what}, {count:,} params"


def learning_rate_schedule(name: str, learning_rate: float, steps: int) -> float | optax.Schedule:
    """``--schedule``'s step size over a run of ``steps`` steps.

    ``"constant"``: ``learning_rate`` throughout. ``"cosine"``: cosine decay
    from ``learning_rate`` to 0 over the run. ``"tail"``: ``learning_rate``
    for the first 90 % of the steps, then a straight line to 0 over the last
    10 % — the constant rate's noise regularises the small mnist1d CNN, and
    the short decay lets the run end in a minimum rather than wherever the
    last noisy step left it (see ``docs/results.md``).

    Example:
      >>> from fbp.cli import learning_rate_schedule
      >>> tail = learning_rate_schedule("tail", 0.02, 1000)
      >>> [round(float(tail(step)), 4) for step in (0, 900, 950, 1000)]
      [0.02, 0.02, 0.01, 0.0]
      >>> round(float(learning_rate_schedule("cosine", 0.02, 0)(0)), 4)  # a run of no steps
      0.02
    """
    if name == "cosine":
        # A run of no steps (--epochs 0: evaluate or resume only) has no decay to place.
        return optax.cosine_decay_schedule(learning_rate, max(1, steps))
    if name == "tail":
        tail = max(1, steps // 10)
        return optax.join_schedules(
            [
                optax.constant_schedule(learning_rate),
                optax.linear_schedule(learning_rate, 0.0, tail),
            ],
            [steps - tail],
        )
    return learning_rate


def _config(args: argparse.Namespace, learning_rate: float) -> dict[str, object]:
    """The settings a resumed run must share with the one that wrote the checkpoint."""
    config = {
        "model": args.model,
        "optimizer": args.optimizer,
        "learning_rate": learning_rate,
        "schedule": args.schedule,
    }
    if args.schedule in ("cosine", "tail"):  # the decay is placed by the run's length
        config["epochs"] = args.epochs
    if args.model == "mlp":
        config |= {"hidden": list(args.hidden), "activation": args.activation}
    return config


def _fail(message: str, status: int = 1) -> int:
    """Say what went wrong in one line on stderr; return the exit status (2: usage, 1: failure)."""
    print(f"fbp train: {message}", file=sys.stderr)
    return status


def _memory_bytes() -> int | None:
    """This machine's physical memory, where the OS says."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # pragma: no cover - not POSIX
        return None


def _mlp_too_big(args: argparse.Namespace, dataset: data.Dataset) -> str | None:
    """Why ``--hidden`` cannot fit in memory (params, gradients and two moments), or ``None``."""
    sizes = (math.prod(dataset.input_shape), *args.hidden, dataset.num_classes)
    count = sum(a * b + b for a, b in itertools.pairwise(sizes))
    need, have = 16 * count, _memory_bytes()  # float32 params, gradients, adam's two moments
    if have is None or need <= have:
        return None
    return (
        f"argument --hidden: {','.join(map(str, args.hidden))} makes {count:.3g} parameters, "
        f"about {need / 2**30:,.0f} GiB to train, more than this machine's "
        f"{have / 2**30:,.0f} GiB of memory"
    )


def _interrupted(directory: Path | None) -> str:
    """What Ctrl-C leaves behind, for the message."""
    if directory is None:
        return "interrupted; nothing was saved (pass --checkpoint-dir to be able to resume)"
    path = directory / CHECKPOINT_NAME
    if not path.exists():
        return f"interrupted before the first checkpoint was written to {directory}"
    try:
        epochs = load_checkpoint(path).metadata["history"]["epoch"]
        held = f"epoch {epochs[-1]}" if epochs else "no epoch yet"
    except (FbpError, KeyError, IndexError, TypeError):
        held = "an unreadable checkpoint"
    return f"interrupted; {path} holds {held}: run the same command to resume"


def train_command(args: argparse.Namespace) -> int:
    """Run ``fbp train``: load, build, (check,) fit, report.

    A user's mistake never ends in a traceback: one line on stderr and exit
    status 2 for a usage error, 1 for a failure (divergence, a checkpoint from
    another run), 130 for Ctrl-C (after saying where the checkpoint is).
    """
    try:
        return _train(args)
    except KeyboardInterrupt:
        return _fail(_interrupted(args.checkpoint_dir), 130)
    except MemoryError:
        return _fail("out of memory; try a smaller --hidden or --batch-size")
    except jax.errors.JaxRuntimeError as error:
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise
        first = str(error).splitlines()[0]
        return _fail(f"out of memory ({first}); try a smaller --hidden or --batch-size")


def _train(args: argparse.Namespace) -> int:
    if args.model == "gpt":
        return _train_gpt(args)
    if args.batch_size is None:
        args.batch_size = 32
    try:
        dataset = data.load(args.dataset)
    except ImportError as error:
        return _fail(str(error))
    if args.model == "mlp" and (why := _mlp_too_big(args, dataset)):
        return _fail(why, 2)
    try:
        model, description = _build_model(args, dataset)
    except FbpError as error:
        return _fail(
            f"--model {args.model} cannot take --dataset {args.dataset} "
            f"(inputs of shape {dataset.input_shape}): {error}",
            2,
        )
    learning_rate = (
        LEARNING_RATES[args.optimizer] if args.learning_rate is None else args.learning_rate
    )
    steps = args.epochs * max(1, len(dataset.x_train) // max(1, args.batch_size))
    if args.schedule == "constant":  # the run's length does not enter the optimizer
        steps = 0
    optimizer = _optimizer(args.optimizer, learning_rate, args.schedule, steps)
    key = jax.random.key(args.seed)
    print(f"fbp train: {dataset!r}")
    decay = {"cosine": ", cosine decay", "tail": ", linear decay over the last 10%"}.get(
        args.schedule, ""
    )
    print(f"model: {description}; {args.optimizer} lr={learning_rate:g}{decay}")
    if args.checkpoint_dir is not None:  # a usage error, found before any training
        try:
            prepare_directory(args.checkpoint_dir, "argument --checkpoint-dir", "path")
        except FbpError as error:
            return _fail(str(error), 2)
    if args.check and not _check_gradients(model, dataset, key, args.batch_size):
        print("fbp train: the gradient check failed; not training", file=sys.stderr)
        return 1
    if args.checkpoint_dir is not None and (args.checkpoint_dir / CHECKPOINT_NAME).exists():
        print(f"resuming from {args.checkpoint_dir / CHECKPOINT_NAME}")
    start = time.perf_counter()
    try:
        _, history = fit(
            model,
            losses.softmax_cross_entropy,
            optimizer,
            dataset,
            epochs=args.epochs,
            batch_size=args.batch_size,
            key=key,
            progress=not args.no_progress,
            checkpoint_dir=args.checkpoint_dir,
            config=_config(args, learning_rate),
        )
    except FbpError as error:  # diverged, or a checkpoint from another run: say so, exit 1
        return _fail(str(error))
    seconds = time.perf_counter() - start
    if history.epoch:
        print(
            f"final train loss {history.train_loss[-1]:.4f}, test loss {history.test_loss[-1]:.4f}"
        )
        print(f"test accuracy: {history.test_accuracy[-1]:.2%} ({seconds:.1f} s)")
    return 0


def _gpt_settings(args: argparse.Namespace, vocab: int) -> dict[str, object]:
    """What ``fbp sample`` needs to rebuild the model (saved in the checkpoint)."""
    return {
        "model": "gpt",
        "vocab_size": vocab,
        "context": args.context,
        "layers": args.layers,
        "heads": args.heads,
        "width": args.width,
        "tied": True,
        "bias": False,
    }


def _build_gpt(settings: dict) -> nn.Layer:
    return _gpt(
        int(settings["vocab_size"]),
        int(settings["context"]),
        int(settings["layers"]),
        int(settings["heads"]),
        int(settings["width"]),
        bool(settings["tied"]),
        bool(settings["bias"]),
    )


@functools.lru_cache(maxsize=8)
def _gpt(vocab: int, context: int, layers: int, heads: int, width: int, tied: bool, bias: bool):
    """:func:`fbp.models.gpt`, the same object for the same settings (as :func:`_network`):
    ``fbp sample`` after ``fbp train --model gpt`` in one process reuses the compiled sampler."""
    return models.gpt(vocab, context, layers, heads, width, tied=tied, bias=bias)


def _sample_text(model, params, vocab: str, context: int, prompt: str, length: int, **kw) -> str:
    ids = data.encode(vocab, prompt)
    new = models.generate(model, params, jnp.asarray(ids), length, context=context, **kw)
    return data.decode(vocab, new)


def _report_eval(step: int, train_loss: float, val_loss: float) -> None:
    """One line per evaluation, above the progress bar."""
    from tqdm.auto import tqdm

    tqdm.write(f"iter {step:6d}: train loss {train_loss:.4f}, val loss {val_loss:.4f}")


def _train_gpt(args: argparse.Namespace) -> int:
    """``fbp train --model gpt``: nanoGPT's CPU baby GPT on a character corpus."""
    batch = GPT_DEFAULTS["batch_size"] if args.batch_size is None else args.batch_size
    learning_rate = args.learning_rate or GPT_DEFAULTS["learning_rate"]
    try:
        dataset = data.load_text(args.text)
    except FbpError as error:
        return _fail(f"argument --text: {error.message}", 2)
    if args.width % args.heads:
        return _fail(f"argument --heads: {args.heads} does not divide --width {args.width}", 2)
    if len(dataset.train) < args.context + 2 or len(dataset.validation) < args.context + 2:
        return _fail(
            f"argument --text: {dataset.name!r} is too short for windows of --context "
            f"{args.context} (train {len(dataset.train)}, validation "
            f"{len(dataset.validation)} characters)",
            2,
        )
    settings = _gpt_settings(args, dataset.vocab_size)
    model = _build_gpt(settings)
    params, _ = jax.eval_shape(lambda: model.init(jax.random.key(0), (args.context,)))
    count = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))
    print(f"fbp train: {dataset!r}")
    print(
        f"model: GPT {args.layers} layers, {args.heads} heads, width {args.width}, context "
        f"{args.context}, tied head, {count:,} params; AdamW lr={learning_rate:g} (warm-up "
        f"100, cosine to {learning_rate / 10:g}), batch {batch}, {args.iters} iterations"
    )
    if args.checkpoint_dir is not None:
        try:
            prepare_directory(args.checkpoint_dir, "argument --checkpoint-dir", "path")
        except FbpError as error:
            return _fail(str(error), 2)
        if (args.checkpoint_dir / GPT_CHECKPOINT_NAME).exists():
            print(f"resuming from {args.checkpoint_dir / GPT_CHECKPOINT_NAME}")
    optimizer = gpt_optimizer(
        args.iters, learning_rate=learning_rate, min_learning_rate=learning_rate / 10
    )
    key = jax.random.key(args.seed)
    start = time.perf_counter()
    try:
        params, history = fit_text(
            model,
            dataset,
            optimizer,
            steps=args.iters,
            batch_size=batch,
            context=args.context,
            key=key,
            eval_every=args.eval_every,
            checkpoint_dir=args.checkpoint_dir,
            metadata={"settings": settings, "learning_rate": learning_rate},
            progress=not args.no_progress,
            on_eval=_report_eval,
        )
    except KeyboardInterrupt:
        where = args.checkpoint_dir
        return _fail(
            f"interrupted; run the same command to resume from {where}"
            if where is not None
            else "interrupted; nothing was saved (pass --checkpoint-dir to be able to resume)",
            130,
        )
    except FbpError as error:
        return _fail(str(error))
    seconds = time.perf_counter() - start
    print(
        f"final val loss {history.val_loss[-1]:.4f} after {args.iters} iterations "
        f"({seconds:.1f} s, {args.iters / seconds:.1f} it/s)"
    )
    if args.sample_length:
        text = _sample_text(
            model,
            params,
            dataset.vocab,
            args.context,
            "\n",
            args.sample_length,
            key=jax.random.fold_in(key, 1),
            temperature=0.8,
            top_k=200,
        )
        print("sample:\n" + text)
    return 0


def sample_command(args: argparse.Namespace) -> int:
    """Run ``fbp sample``: load a GPT checkpoint and continue ``--prompt``."""
    path = args.checkpoint_dir / GPT_CHECKPOINT_NAME
    if not path.exists():
        print(
            f"fbp sample: no {GPT_CHECKPOINT_NAME} in {args.checkpoint_dir} "
            "(train one with fbp train --model gpt --checkpoint-dir DIR)",
            file=sys.stderr,
        )
        return 2
    try:
        saved = load_checkpoint(path)
        settings, vocab = saved.metadata["settings"], saved.metadata["vocab"]
        model = _build_gpt(settings)
        text = _sample_text(
            model,
            saved.params,
            vocab,
            int(settings["context"]),
            args.prompt,
            args.length,
            key=jax.random.key(args.seed),
            temperature=args.temperature,
            top_k=args.top_k,
        )
    except (KeyError, TypeError):
        print(f"fbp sample: {path} is not a GPT checkpoint of fbp train", file=sys.stderr)
        return 1
    except FbpError as error:
        print(f"fbp sample: {error}", file=sys.stderr)
        return 1
    print(args.prompt + text)
    return 0


def builtin_layer_cases() -> tuple[catalogue.Case, ...]:
    """Every public layer (and a few compositions): :data:`fbp.nn.catalogue.LAYERS`."""
    return catalogue.LAYERS


def sample_model_cases() -> list[tuple[str, nn.Layer, jax.Array, jax.Array]]:
    """Whole models ``fbp check`` verifies end to end: ``(name, model, x, labels)``."""
    dataset = data.load("digits")
    ids = jax.random.randint(jax.random.key(1), (6, 5), 0, 11)
    return [
        (
            "sample model: dense 64-32-16-10 ReLU on digits",
            models.mlp((32, 16), dataset.num_classes, "relu"),
            jnp.asarray(dataset.x_train[:16]),
            jnp.asarray(dataset.y_train[:16]),
        ),
        (
            "sample model: embedding(11→4) → mean_over_time → dense on integer ids",
            nn.serial(nn.embedding(11, 4), nn.mean_over_time(), nn.dense(3)),
            ids,
            jnp.arange(6) % 3,
        ),
        (
            "sample model: a one-block GPT with its head tied to the embedding, on 11 ids",
            models.gpt(11, 5, layers=1, heads=2, width=8),
            ids,
            jnp.roll(ids, -1, axis=1),
        ),
    ]


def check_command(args: argparse.Namespace) -> int:
    """Run ``fbp check``: every built-in layer, then sample models; 1 if anything fails."""
    from fbp import verify

    key = jax.random.key(args.seed)
    failed = []
    for i, case in enumerate(builtin_layer_cases()):
        report = catalogue.check(case, jax.random.fold_in(key, i))
        print(f"{'ok  ' if report.ok else 'FAIL'} {case.title}")
        if not args.quiet or not report.ok:
            print(report, end="\n\n")
        if not report.ok:
            failed.append(case.title)
    for name, model, x, y in sample_model_cases():
        params, _ = model.init(key, x.shape[1:])
        report = verify.check_model(model, losses.softmax_cross_entropy, params, x, y)
        print(f"{'ok  ' if report.ok else 'FAIL'} {name}")
        if not args.quiet or not report.ok:
            print(report, end="\n\n")
        if not report.ok:
            failed.append(name)
    if failed:
        print(f"\nfbp check: {len(failed)} failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    print("\nfbp check: every hand-derived gradient agrees with jax.vjp and finite differences")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fbp`` console script."""
    args = _parser().parse_args(argv)
    if args.command == "train":
        return train_command(args)
    if args.command == "check":
        return check_command(args)
    if args.command == "sample":
        return sample_command(args)
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
