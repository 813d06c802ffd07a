"""Device commands: ``enroll``, ``predict`` and ``store list | forget | rename``.

They need only the runtime (numpy, onnxruntime): each maps its options onto one
:mod:`edgemeta.runtime` call. Store files are changed under their lock (load, add,
save atomically), so what was enrolled before is never lost.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Callable, List, Optional

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from edgemeta.cli._app import app, command, console, emit_json, out
from edgemeta.runtime.errors import InputError

store_app = typer.Typer(name="store", help="Inspect and edit a prototype store file.", no_args_is_help=True)
app.add_typer(store_app, name="store")

PROVIDERS_HELP = "auto (TensorRT, CUDA, CPU: the first that loads), or a comma-separated list such as cuda,cpu."
PROGRESS_MIN = 32  # show a progress bar from this many images


def store_command(name: str):
    """``store_app.command`` with the same error boundary as :func:`command`."""
    return command(name, target=store_app)


@contextlib.contextmanager
def _progress(total: int, enabled: bool) -> Iterator[Callable[[int], None]]:
    if not enabled or total < PROGRESS_MIN:
        yield lambda n: None
        return
    if not console.is_terminal:  # a log: a line when embedding starts, then a heartbeat
        from edgemeta.progress import StageLog, plain_progress_wanted

        if not plain_progress_wanted():
            yield lambda n: None
            return
        with StageLog() as log:
            task = log.add_task("embedding", total=total)
            yield lambda n: log.advance(task, n)
        return
    columns = (TextColumn("embedding"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("embedding", total=total)
        yield lambda n: bar.advance(task, n)


def _counts_table(title: str, counts: dict[str, int], added: dict[str, int] | None = None) -> Table:
    table = Table(title=escape(title))
    table.add_column("label")
    if added is not None:
        table.add_column("added", justify="right")
    table.add_column("examples", justify="right")
    for label, n in counts.items():
        row = (
            [Text(label), str(added.get(label, 0))] if added is not None else [Text(label)]
        )  # Text: a label is never markup
        table.add_row(*row, str(n))
    return table


LOCK_TIMEOUT_HELP = "Seconds to wait for another writer of the store (default: wait, saying so)."


def _tell(line: str) -> None:
    """A lock wait, said on stderr (a user is never left waiting in silence)."""
    sys.stderr.write(f"{line}\n")
    sys.stderr.flush()


@command("enroll")
def enroll_cmd(
    model: Path = typer.Argument(..., help="Exported .onnx model."),
    images: Optional[List[Path]] = typer.Argument(
        None, help="Images (or folders of images) of the class given by --label."
    ),
    store: Path = typer.Option(..., "--store", "-s", help="Prototype store file; created if missing, else added to."),
    label: Optional[str] = typer.Option(None, "--label", "-l", help="Class of the IMAGES."),
    folder: Optional[Path] = typer.Option(
        None, "--folder", help="Enrol every class subfolder of this folder (label = subfolder name)."
    ),
    providers: str = typer.Option("auto", help=PROVIDERS_HELP),
    keep_embeddings: bool = typer.Option(
        False, "--keep-embeddings", help="Keep each embedding in a new store (k-NN, calibration)."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print JSON to stdout."),
    lock_timeout: Optional[float] = typer.Option(None, "--lock-timeout", help=LOCK_TIMEOUT_HELP),
) -> None:
    """Learn classes from a few images and add them to a store file."""
    from edgemeta.runtime import ClassifierOptions, FewShotClassifier, list_images, scan_class_folders
    from edgemeta.runtime.store import check_label

    if (folder is None) == (label is None) or (label is not None and not images) or (folder is not None and images):
        raise InputError("give either --label LABEL with IMAGES, or --folder DIR (one subfolder per class)")
    if label is not None:
        label = check_label(label)  # as the store keeps it (composed form), so the counts below match
    paths = scan_class_folders(folder) if folder is not None else {label: list_images(images)}
    clf = FewShotClassifier(model, providers, options=ClassifierOptions(keep_embeddings=keep_embeddings))
    total = sum(len(p) for p in paths.values())
    with clf.editing(store, timeout=lock_timeout, on_wait=_tell), _progress(total, not json_out) as advance:
        if (
            keep_embeddings and not clf.store.keep_embeddings
        ):  # the store's own setting wins; nothing is saved after this
            raise InputError(
                f"{store} keeps no embeddings, so --keep-embeddings cannot apply "
                "to it; enrol into a new store file with --keep-embeddings"
            )
        added = clf.enroll_folder(folder, on_progress=advance) if folder is not None else {label: len(paths[label])}
        if folder is None:
            clf.enroll(label, paths[label], on_progress=advance)
    if json_out:
        emit_json({"store": str(store), "added": added, "counts": clf.counts, "providers": clf.providers})
    else:
        out.print(_counts_table(f"{store} ({', '.join(clf.providers)})", clf.counts, added))


@command("predict")
def predict_cmd(
    model: Path = typer.Argument(..., help="Exported .onnx model."),
    images: List[Path] = typer.Argument(..., help="Images, or folders of images, to classify."),
    store: Path = typer.Option(..., "--store", "-s", help="Prototype store made with this model."),
    top_k: int = typer.Option(1, "--top-k", "-k", help="How many ranked classes to report."),
    threshold: Optional[float] = typer.Option(
        None, help="Open-set distance threshold (default: the model's documented default)."
    ),
    knn: Optional[int] = typer.Option(
        None, help="Classify by the mean of the K nearest enrolled examples (store must keep embeddings)."
    ),
    providers: str = typer.Option("auto", help=PROVIDERS_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print JSON to stdout."),
) -> None:
    """Classify images against the classes of a store."""
    from edgemeta.runtime import ClassifierOptions, FewShotClassifier, Mode, list_images

    if knn is not None and knn < 1:
        raise InputError(
            f"--knn must be at least 1 (the K nearest examples), got {knn}; leave it out to classify by prototypes"
        )
    options = ClassifierOptions(threshold=threshold, mode=Mode.KNN if knn else Mode.PROTOTYPE, knn_k=knn or 1)
    clf = FewShotClassifier(model, providers, options=options).load(store)
    paths = list_images(images)
    preds = clf.predict(paths, top_k=top_k)
    if json_out:
        emit_json(
            {
                "providers": clf.providers,
                "threshold": clf.threshold,
                "predictions": [{"image": str(p), **r.to_dict()} for p, r in zip(paths, preds)],
            }
        )
        return
    names = image_names(paths, max(out.width // 3, 16))
    table = Table(title=escape(f"{len(paths)} image(s), {len(clf.labels)} classes ({', '.join(clf.providers)})"))
    for col in ("image", "label", "probability", "distance", "top-k"):
        # fold, never cut: a cut name could make two rows look alike
        table.add_column(col, justify="right" if col in ("probability", "distance") else "left", overflow="fold")
    for name, r in zip(names, preds):
        label = f"unknown (nearest: {r.label})" if r.unknown else r.label
        others = ", ".join(f"{c.label} {c.probability:.2f}" for c in r.top_k)
        table.add_row(Text(name), Text(label), f"{r.probability:.3f}", f"{r.distance:.4f}", Text(others))
    out.print(table)


def image_names(paths: List[Path], width: int) -> List[str]:
    """How the table names each image: its path where every path fits in ``width`` columns, else
    the shortest tail of the path (the file name, then its folders) that still tells the images
    apart. The full paths are in ``--json``."""
    full = [str(p) for p in paths]
    if not full or max(map(len, full)) <= width:
        return full
    parts = [Path(p).parts for p in paths]
    distinct = len(set(full))
    for depth in range(1, max(map(len, parts)) + 1):
        names = [str(Path(*pt[-depth:])) for pt in parts]
        if len(set(names)) == distinct:
            return names
    return full


@store_command("list")
def store_list_cmd(
    store: Path = typer.Argument(..., help="Prototype store file."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON to stdout."),
) -> None:
    """Show the classes of a store and their example counts."""
    from edgemeta.runtime import PrototypeStore

    s = PrototypeStore.load(store)
    if json_out:
        emit_json(
            {
                "store": str(store),
                "fingerprint": s.fingerprint,
                "embedding_dim": s.embedding_dim,
                "metric": s.metric.value,
                "keep_embeddings": s.keep_embeddings,
                "counts": s.counts,
            }
        )
    else:
        out.print(
            _counts_table(
                f"{store}: {len(s)} classes, model {s.fingerprint}, {s.embedding_dim}-D {s.metric.value}", s.counts
            )
        )


@store_command("forget")
def store_forget_cmd(
    store: Path = typer.Argument(..., help="Prototype store file."),
    label: str = typer.Argument(..., help="Class to remove."),
    lock_timeout: Optional[float] = typer.Option(None, "--lock-timeout", help=LOCK_TIMEOUT_HELP),
) -> None:
    """Remove a class from a store."""
    from edgemeta.runtime import PrototypeStore

    with PrototypeStore.edit(store, timeout=lock_timeout, on_wait=_tell) as s:
        s.forget(label)
    console.print(f"forgot {label!r}; {len(s)} classes left in {store}", markup=False, highlight=False)


@store_command("rename")
def store_rename_cmd(
    store: Path = typer.Argument(..., help="Prototype store file."),
    old: str = typer.Argument(..., help="Current label."),
    new: str = typer.Argument(..., help="New label."),
    merge: bool = typer.Option(False, "--merge", help="If NEW exists, combine OLD's examples into it."),
    lock_timeout: Optional[float] = typer.Option(None, "--lock-timeout", help=LOCK_TIMEOUT_HELP),
) -> None:
    """Rename a class (or merge it into another with --merge)."""
    from edgemeta.runtime import PrototypeStore

    with PrototypeStore.edit(store, timeout=lock_timeout, on_wait=_tell) as s:
        merged = merge and new in s
        s.rename(old, new, merge=merge)
    console.print(
        f"{'merged' if merged else 'renamed'} {old!r} {'into' if merged else 'to'} {new!r} in {store}",
        markup=False,
        highlight=False,
    )
