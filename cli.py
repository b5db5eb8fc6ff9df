"""What every script shares: typed arguments, logging, progress, devices, one-line errors.

A script's settings are one dataclass whose fields are its flags (``arg`` gives a field its
help text, choices or parser); ``ArgsParser`` turns the dataclass into an argparse parser that
shows every default in ``--help`` and whose ``parse_args`` returns the dataclass itself, so the
settings checked in its ``__post_init__`` are what ``main`` receives and what the checkpoint or
result JSON stores (``asdict``). The flags several scripts have (``--seed``, ``--threads``,
``--device``, ``--json``, ``--output``) are defined here once.

``run`` is every script's entry point: a bad input ends in one line naming it (exit 2), never a
traceback; Ctrl-C ends in one line too (exit 130), after the script's own clean-up ran.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
import types
import typing
from dataclasses import MISSING, dataclass, field

log = logging.getLogger("cli")

# ----------------------------------------------------------------------------- typed flags


def arg(default=None, help: str = "", *, factory=None, **argparse_kwargs):
    """A dataclass field that is also a flag: ``help`` for ``--help``; ``argparse_kwargs``
    (``choices``, ``type``, ``nargs``, ``metavar``, ``required``) go to ``add_argument``
    (``positional=True``: an argument without ``--``); ``factory`` for a mutable default."""
    meta = {"help": help, **argparse_kwargs}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def device_arg():
    return arg("cpu", "torch device: cpu, cuda, cuda:N, or auto (CUDA when present, else CPU)")


@dataclass
class OptimArgs:
    """The optimisation flags and the device of the training scripts (a script redeclares a field
    to change its default)."""

    epochs: int = arg(60, "training epochs")
    batch_size: int = arg(256, "examples per optimisation step")
    lr: float = arg(2e-3, "peak learning rate")
    seed: int = arg(0, "random seed (data split, initialisation, sampling)")
    threads: int = arg(2, "torch intra-op threads")
    device: str = device_arg()

    def check_optim(self) -> None:
        """Check the optimisation flags and resolve --device (a clear error for a missing one)."""
        self.device = str(resolve_device(self.device))
        require_counts(self, "epochs", "batch_size", "threads")
        # an Adam step of more than 1 is a typo, and it diverges
        require(0 < self.lr <= 1, f"--lr must be in (0, 1], got {self.lr}")


def seed_arg(default: int = 0):
    return arg(default, "random seed (data split, initialisation, sampling)")


def threads_arg(default: int = 1):
    return arg(default, "torch intra-op threads (1 is fastest at batch 1)")


def json_arg():
    return arg(None, "also write the printed numbers to this JSON file", metavar="PATH")


def output_arg(default: str, what: str):
    return arg(default, f"where to write {what}", metavar="PATH")


def _base_type(annotation):
    """``int | None`` -> int; ``list[float]`` -> (list, float)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _base_type(args[0])
    if origin in (list, tuple):
        inner = typing.get_args(annotation)
        return origin, (inner[0] if inner else str)
    return None, annotation


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every default in --help, unless the help text already says it or there is none to say
    (an unset path, an off switch)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text or action.default is None or action.default is False
                or action.default == argparse.SUPPRESS or not action.option_strings):
            return text
        return super()._get_help_string(action)


class ArgsParser(argparse.ArgumentParser):
    """An argparse parser built from a settings dataclass; ``parse_args`` returns an instance
    of it (its ``__post_init__`` checks run there)."""

    def __init__(self, settings_cls, description: str, epilog: str | None = None):
        super().__init__(description=description, epilog=epilog,
                         formatter_class=_DefaultsFormatter)
        self.settings_cls = settings_cls
        hints = typing.get_type_hints(settings_cls)
        inherited = {f.name for base in settings_cls.__mro__[1:] if dataclasses.is_dataclass(base)
                     for f in dataclasses.fields(base)}
        own = set(settings_cls.__dict__.get("__annotations__", {})) - inherited
        fields = dataclasses.fields(settings_cls)  # the script's own flags first, shared groups after
        for f in [f for f in fields if f.name in own] + [f for f in fields if f.name not in own]:
            meta = dict(f.metadata)
            if "help" not in meta:
                continue  # not a flag (set by the script, not the user)
            kwargs = dict(meta, help=meta["help"].replace("%", "%%"))  # argparse formats help with %
            default = f.default if f.default is not MISSING else f.default_factory()
            container, base = _base_type(hints[f.name])
            if base is bool and "type" not in kwargs:
                kwargs["action"] = "store_false" if default else "store_true"
            else:
                if "type" not in kwargs and base in (int, float, str):
                    kwargs["type"] = base
                if container is list and "nargs" not in kwargs and "type" not in meta:
                    kwargs["nargs"] = "+"
            if kwargs.get("required"):
                default = None
            if kwargs.pop("positional", False):
                self.add_argument(f.name, default=default, **kwargs)
            else:
                self.add_argument(f"--{f.name}", default=default, **kwargs)

    def parse_args(self, args=None, namespace=None):
        ns = super().parse_args(args, namespace)
        return self.settings_cls(**vars(ns))


def settings_dict(settings) -> dict:
    """The settings as plain JSON values (what checkpoints and results store)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(settings).items()}


# ----------------------------------------------------------------------------- flag values


def float_list(value: str) -> list[float]:
    """'0.1,0.2' -> [0.1, 0.2], every value finite and >= 0."""
    try:
        out = [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of numbers, got {value!r}") from None
    if not out or any(not v >= 0 or v == float("inf") for v in out):
        raise argparse.ArgumentTypeError(f"expected a comma list of finite numbers >= 0, got {value!r}")
    return out


def int_list(value: str) -> list[int]:
    """'1,2,4' -> [1, 2, 4], every value an integer >= 1."""
    try:
        out = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of whole numbers, got {value!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected a comma list of whole numbers >= 1, got {value!r}")
    return out


def require(condition: bool, message: str) -> None:
    """Settings checks: ``require(x >= 1, f"--workers must be >= 1, got {x}")``."""
    if not condition:
        raise ValueError(message)


def require_counts(settings, *names: str) -> None:
    """Every named setting is a count: an integer >= 1 (the error names the flag)."""
    for name in names:
        value = getattr(settings, name)
        require(value is not None and value >= 1, f"--{name} must be >= 1, got {value}")


def require_positive(flag: str, value, allow_zero: bool = False) -> None:
    ok = value is not None and value == value and value != float("inf") and (value >= 0 if allow_zero else value > 0)
    require(ok, f"{flag} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def require_file(flag: str, path: str | None) -> None:
    require(path is not None and os.path.isfile(path), f"{flag} {path}: no such file")


# ----------------------------------------------------------------------------- devices


def resolve_device(name: str):
    """'cpu', 'cuda', 'cuda:N', 'mps' or 'auto' (CUDA when present, else CPU) -> torch.device;
    a device that is not there is a ValueError naming --device."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device (cpu, cuda, cuda:N, mps or auto)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available here (torch {torch.__version__}); "
                             "use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available here")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {name!r}: not supported (cpu, cuda, cuda:N, mps or auto)")
    return device


def synchronize(device) -> None:
    """Wait for queued kernels (CUDA runs asynchronously: a latency needs this)."""
    import torch

    if getattr(device, "type", device) == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- logging


def stderr_is_terminal() -> bool:
    return sys.stderr.isatty()


class _TqdmHandler(logging.StreamHandler):
    """Log lines printed above a live progress bar instead of through it."""

    def emit(self, record):
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


def quiet_simulator_logs() -> None:
    """robosuite warns at every import that it has no private macro file (three lines, in every
    worker process); the toolkit needs none. Dropped before robosuite is imported."""
    def keep(record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not ("macro file" in msg or "setup_macros" in msg)

    logging.getLogger("robosuite_logs").addFilter(keep)
    logging.getLogger("OpenGL").setLevel(logging.WARNING)


def setup_logging(level: int = logging.INFO) -> None:
    """One format for every script; lines go above a progress bar, never through it."""
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    quiet_simulator_logs()


def log_settings(settings, logger: logging.Logger) -> None:
    """The resolved settings, one line, at the start of a run."""
    logger.info("settings: %s", ", ".join(f"{k}={v}" for k, v in settings_dict(settings).items()))


def start(settings, logger: logging.Logger) -> None:
    """A script's first step: logging set up, the resolved settings logged."""
    setup_logging()
    log_settings(settings, logger)


class progress:
    """A tqdm bar on a terminal; when stderr is piped, one log line every ``every_seconds``
    (and at the end) instead of a bar redrawn into the log."""

    def __init__(self, iterable=None, total: int | None = None, desc: str = "", unit: str = "it",
                 every_seconds: float = 30.0, disable: bool = False):
        self.iterable, self.desc, self.unit, self.every = iterable, desc, unit, every_seconds
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.n, self.postfix, self.disable = 0, "", disable
        self.bar = None
        if not disable and stderr_is_terminal():
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, desc=desc, unit=unit)
        self.t0 = self.last = time.perf_counter()

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif not self.disable and time.perf_counter() - self.last >= self.every:
            self._log()

    def set_postfix(self, **values) -> None:
        self.postfix = " ".join(f"{k}={v}" for k, v in values.items())
        if self.bar is not None:
            self.bar.set_postfix(values)

    def _log(self) -> None:
        self.last = time.perf_counter()
        of = f"/{self.total}" if self.total else ""
        log.info("%s: %d%s %s %s(%.0f s)", self.desc, self.n, of, self.unit,
                 f"{self.postfix} " if self.postfix else "", self.last - self.t0)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif not self.disable and self.n:
            self._log()
            self.disable = True


def save_json(path: str | None, obj, logger: logging.Logger = log) -> None:
    """--json: write ``obj`` there (atomically) when a path was given."""
    if path:
        from fileio import write_json

        write_json(path, obj)
        logger.info("wrote %s", path)


# ----------------------------------------------------------------------------- entry point

# What a bad input raises; a bug's exception type stays a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, KeyError, PermissionError, IsADirectoryError,
               NotADirectoryError)


def caused_by_interrupt(exc: BaseException) -> bool:
    """Whether ``exc`` is Ctrl-C, or an error a library raised because Ctrl-C reached it.

    IMPORTANT: a KeyboardInterrupt that lands inside a numba-compiled function (robosuite's
    OSC controller, ``opspace_matrices``) comes out as ``SystemError: ... returned a result
    with an exception set``, chained to the interrupt."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def run(main, parser: argparse.ArgumentParser, argv=None, extra_errors: tuple = ()) -> None:
    """``main(parser.parse_args(argv))`` with one-line errors: a bad input exits 2 with
    ``error: ...`` naming it, Ctrl-C exits 130."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "toolkit"
    try:
        main(parser.parse_args(argv))
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:
        if caused_by_interrupt(exc):
            print(f"{name}: interrupted", file=sys.stderr)
            sys.exit(130)
        if not isinstance(exc, USER_ERRORS + tuple(extra_errors)):
            raise
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"{name}: error: {message}", file=sys.stderr)
        sys.exit(2)
