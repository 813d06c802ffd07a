"""N-way K-shot Q-query episodes: a seeded sampler and a fixed-episodes file format.

The sampler draws episode ``i`` from ``numpy.random.default_rng([seed, i])``, so
the sequence is reproducible, independent of how many episodes came before, and
training resumes on exactly the episodes it would have seen.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgemeta.runtime.errors import DataError, InputError

__all__ = ["Episode", "EpisodeSampler", "EpisodeFile", "write_episodes_file", "read_episodes_file"]

EPISODES_FORMAT = "edgemeta.episodes"
EPISODES_VERSION = 1


@dataclass(frozen=True)
class Episode:
    """Indices into a data set; ``support`` is class-major (class 0's K shots first)."""

    classes: np.ndarray  # [N] class ids of the data set
    support: np.ndarray  # [N*K] image indices
    query: np.ndarray  # [N*Q] image indices
    support_labels: np.ndarray  # [N*K] in 0..N-1
    query_labels: np.ndarray  # [N*Q] in 0..N-1


class EpisodeSampler:
    """Seeded N-way K-shot Q-query episodes over integer ``labels``.

    Example:
        >>> sampler = EpisodeSampler(labels, n_way=5, k_shot=1, q_query=15, seed=0)
        >>> ep = sampler.episode(0)
    """

    def __init__(
        self,
        labels: np.ndarray,
        n_way: int,
        k_shot: int,
        q_query: int,
        seed: int = 0,
        name: str = "data set",
        remedy: str | None = None,
    ) -> None:
        """``remedy``: what the error for too little data tells the user to do, for callers
        whose command has no --n-way, --k-shot or --queries to lower."""
        for what, v, lo in (("n_way", n_way, 2), ("k_shot", k_shot, 1), ("q_query", q_query, 1)):
            if not isinstance(v, (int, np.integer)) or v < lo:
                raise InputError(f"{what} must be an integer >= {lo}, got {v!r}")
        self.n_way, self.k_shot, self.q_query, self.seed = int(n_way), int(k_shot), int(q_query), int(seed)
        labels = np.asarray(labels)
        order = np.argsort(labels, kind="stable")
        classes, starts = np.unique(labels[order], return_index=True)
        self._by_class = np.split(order, starts[1:])
        counts = np.array([len(ix) for ix in self._by_class])
        self._eligible = classes[counts >= self.k_shot + self.q_query]
        self._index = {int(c): i for i, c in enumerate(classes)}
        if len(classes) < self.n_way:
            raise DataError(
                f"{name} has {len(classes)} classes, fewer than {n_way}-way; "
                f"{remedy or f'lower --n-way to at most {len(classes)}'}"
            )
        if len(self._eligible) < self.n_way:
            raise DataError(
                f"{name}: only {len(self._eligible)} classes have {self.k_shot + self.q_query} images "
                f"(K={k_shot} shots + Q={q_query} queries), {n_way} needed; {remedy or 'lower --k-shot/--queries'} "
                f"(smallest class has {counts.min()} images)"
            )

    def episode(self, i: int) -> Episode:
        rng = np.random.default_rng([self.seed, int(i)])
        classes = rng.choice(self._eligible, size=self.n_way, replace=False)
        k, q = self.k_shot, self.q_query
        picks = [rng.choice(self._by_class[self._index[int(c)]], size=k + q, replace=False) for c in classes]
        support = np.concatenate([p[:k] for p in picks])
        query = np.concatenate([p[k:] for p in picks])
        return Episode(
            classes=classes,
            support=support,
            query=query,
            support_labels=np.repeat(np.arange(self.n_way), k),
            query_labels=np.repeat(np.arange(self.n_way), q),
        )

    def __call__(self, count: int, start: int = 0) -> Iterator[Episode]:
        for i in range(start, start + count):
            yield self.episode(i)


@dataclass(frozen=True)
class EpisodeFile:
    """Fixed episodes by file path: what a published protocol ships."""

    n_way: int
    k_shot: int
    q_query: int
    episodes: list[dict]  # {"support": [[path, label], ...], "query": [[path, label], ...]}
    base: Path

    def resolve(self, rel: str) -> Path:
        return (self.base / rel).resolve()


def write_episodes_file(
    path: str | os.PathLike,
    paths: Sequence[str],
    labels: np.ndarray,
    classes: Sequence[str],
    sampler: EpisodeSampler,
    count: int,
) -> None:
    """Write ``count`` episodes of ``sampler`` over images ``paths`` (absolute or relative to cwd).

    Every image the episodes use is decoded first, so the file never names one that
    evaluation cannot read; the file is written atomically.

    Raises:
        DataError: an image the episodes use cannot be decoded (named with its class folder).
    """
    from edgemeta.runtime.files import atomic_write
    from edgemeta.runtime.preprocess import decode

    out = Path(path)
    base = out.parent.resolve()
    episodes = list(sampler(count))
    for ix in sorted({int(i) for ep in episodes for i in np.concatenate([ep.support, ep.query])}):
        try:
            decode(paths[ix]).close()
        except InputError as e:
            raise DataError(f"{e}; remove or replace that file, then write the episodes again") from None

    def entry(ix: int) -> list:
        return [os.path.relpath(Path(paths[ix]).resolve(), base), classes[int(labels[ix])]]

    eps = [{"support": [entry(i) for i in ep.support], "query": [entry(i) for i in ep.query]} for ep in episodes]
    doc = {
        "format": EPISODES_FORMAT,
        "version": EPISODES_VERSION,
        "n_way": sampler.n_way,
        "k_shot": sampler.k_shot,
        "q_query": sampler.q_query,
        "seed": sampler.seed,
        "episodes": eps,
    }
    atomic_write(out, lambda tmp: Path(tmp).write_text(json.dumps(doc)))


def _episode_problems(i: int, ep: dict, header: dict[str, int]) -> list[str]:
    """What is wrong with well-formed episode ``i``: labels, leakage, and the header's N/K/Q."""
    problems = []
    support, query = ep["support"], ep["query"]
    s_count: dict[str, int] = {}
    q_count: dict[str, int] = {}
    for x in support:
        s_count[str(x[1])] = s_count.get(str(x[1]), 0) + 1
    for x in query:
        q_count[str(x[1])] = q_count.get(str(x[1]), 0) + 1
    bad = set(q_count) - set(s_count)
    if bad:
        problems.append(f"episode {i}: query labels with no support images: {sorted(bad)[:3]}")
    # the same image as support and query is its own nearest prototype: the score would be inflated
    leaked = {os.path.normpath(str(x[0])) for x in support} & {os.path.normpath(str(x[0])) for x in query}
    if leaked:
        problems.append(
            f"episode {i}: {len(leaked)} support image(s) also used as "
            f"queries, e.g. {sorted(leaked)[0]}; an image must not be both"
        )
    found = {"n_way": {len(s_count)}, "k_shot": set(s_count.values()), "q_query": {q_count.get(c, 0) for c in s_count}}
    for key, n in header.items():
        if found[key] != {n}:
            problems.append(f"episode {i}: {key} {'/'.join(map(str, sorted(found[key])))}, the header says {n}")
    return problems


MAX_EPISODES_BYTES = 1 << 28


def _entry_ok(x: object) -> bool:
    """``[path, label]``: two strings of text (no control characters or lone surrogates), the
    path relative and inside the file's folder tree or absolute, never empty."""
    from edgemeta.runtime.schema import SchemaError, check_text

    if not (isinstance(x, list) and len(x) == 2 and all(type(v) is str and v for v in x)):
        return False
    try:
        for v in x:
            check_text(v, "entry", max_len=4096)
    except SchemaError:
        return False
    return "\0" not in x[0]


def read_episodes_file(path: str | os.PathLike) -> EpisodeFile:
    """Read and validate an episodes file; every problem is reported in one error."""
    from edgemeta.runtime.files import check_readable, read_limited
    from edgemeta.runtime.schema import SchemaError, loads

    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path} is a folder, not an episodes file; pass the JSON file `edgemeta episodes` wrote")
    if check_readable(path, "episodes file") is None:
        raise InputError(f"episodes file not found: {path}")
    try:
        data = read_limited(path, MAX_EPISODES_BYTES, "episodes file")
        doc = loads(data, limit=MAX_EPISODES_BYTES, max_depth=5, max_string=4096)
    except SchemaError as e:
        raise InputError(f"{path} is not a JSON episodes file ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != EPISODES_FORMAT:
        raise InputError(f'{path} is not an edgemeta episodes file (missing "format": "{EPISODES_FORMAT}")')
    version = doc.get("version")
    if type(version) is not int or not 1 <= version <= EPISODES_VERSION:
        raise InputError(
            f"{path}: episodes file version {version!r} is not supported; this edgemeta reads version "
            f"{EPISODES_VERSION} (upgrade edgemeta for a newer file, or write it again with `edgemeta episodes`)"
        )
    problems, header = [], {}
    for key in (
        "n_way",
        "k_shot",
        "q_query",
    ):  # optional in a hand-written file; checked against the episodes when given
        if key in doc:
            if type(doc[key]) is int and doc[key] >= 1:
                header[key] = doc[key]
            else:
                problems.append(f"header {key} must be a positive integer, got {doc[key]!r}")
    eps = doc.get("episodes")
    if not isinstance(eps, list) or not eps:
        problems.append("no episodes")
        eps = []
    for i, ep in enumerate(eps):
        well_formed = True
        for part in ("support", "query"):
            items = ep.get(part) if isinstance(ep, dict) else None
            if not isinstance(items, list) or not items or not all(_entry_ok(x) for x in items):
                problems.append(
                    f"episode {i}: '{part}' must be a non-empty list of [path, label] (two strings of text)"
                )
                well_formed = False
                continue
            missing = [x[0] for x in items if not (path.parent / str(x[0])).is_file()]
            if missing:
                problems.append(f"episode {i}: {len(missing)} missing image(s), e.g. {missing[0]}")
        if well_formed:
            problems += _episode_problems(i, ep, header)
        if len(problems) > 10:
            break
    if problems:
        raise InputError(f"{path}: " + "; ".join(problems[:10]))
    return EpisodeFile(header.get("n_way", 0), header.get("k_shot", 0), header.get("q_query", 0), eps, path.parent)


def make_episodes_file(
    folder: str | os.PathLike, out: str | os.PathLike, n_way: int, k_shot: int, q_query: int, count: int, seed: int = 0
) -> int:
    """Sample ``count`` episodes over ``folder/<class>/<image>`` and write them to ``out``.

    ``out`` may replace an earlier episodes file, never anything else, and must lie
    outside ``folder``.
    """
    from edgemeta.data import IMAGE_EXTENSIONS
    from edgemeta.runtime.files import check_output, json_document

    root = Path(folder)
    if not root.is_dir():
        raise InputError(f"{root} is not a folder of class folders; pass a folder like root/<class>/<image>.png")
    target = Path(out)
    if root.resolve() in target.resolve().parents:  # it would sit among the images it describes
        raise InputError(f"-o {target} is inside the image folder {root}; write the episodes file outside it")
    paths, labels, classes = [], [], []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(f for f in d.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise DataError(f"class folder {d} holds no images; add images or remove it")
        classes.append(d.name)
        paths += [str(f) for f in files]
        labels += [len(classes) - 1] * len(files)
    if not classes:
        raise DataError(f"{root} has no class folders")
    if count < 1:
        raise InputError(f"episodes must be >= 1, got {count}")
    is_episodes = lambda p: isinstance(doc := json_document(p), dict) and doc.get("format") == EPISODES_FORMAT  # noqa: E731
    check_output(target, option="-o", what="file written by edgemeta episodes", inputs=paths, is_own=is_episodes)
    sampler = EpisodeSampler(np.array(labels), n_way, k_shot, q_query, seed, str(root))
    write_episodes_file(target, paths, np.array(labels), classes, sampler, count)
    return count
