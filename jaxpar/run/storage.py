"""Workdirs on object storage (issue #34): ``--workdir s3://BUCKET/PATH`` or ``gs://BUCKET/PATH``.

A run on object storage works in a local mirror of its workdir (``$JAXPAR_MIRRORS``, else
``~/.cache/jaxpar/workdirs/<bucket>-<hash of the URL>``), rebuilt from the store at every start:
its run files (config, metrics, events, history) and its complete checkpoints are downloaded,
the run trains as in any local workdir, and each checkpoint of the persistent tier is uploaded
once Orbax has finished it, file by file and then ``commit_success.txt`` (Orbax's own marker of
a complete step on stores without an atomic rename). A step without the marker (a process
killed mid-upload) is never read back; the store keeps the last ``--keep`` complete steps. The
run files are uploaded with each checkpoint and when the run ends, however it ends.

Why a mirror and not Orbax writing to the store: Orbax 0.12 writes arrays to ``gs://`` through
TensorStore but not to ``s3://`` (google/orbax#359), and one mechanism serves both schemes,
every file a run writes, and the local tier (``jaxpar.run.tiers``) unchanged. The price: a save
to the store blocks training for its upload, and the node needs local disk for the mirror.

Credentials and endpoints come the standard way: ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``
(or a profile) and ``AWS_ENDPOINT_URL`` for S3-compatible servers through s3fs; Google's default
credentials and ``STORAGE_EMULATOR_HOST`` for ``gs://`` through gcsfs. One process for now: a
job of several would need every process's shards in one place before the upload.
"""

import contextlib
import fnmatch
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import jax

from jaxpar.core.errors import UserError

SCHEMES = {"s3": "s3fs", "gs": "gcsfs"}  # URL scheme: the fsspec package that serves it
COMMITTED = "commit_success.txt"  # the last file of an uploaded step (Orbax's name for it)
# Bounded waits: a store that cannot be reached is reported in seconds, not after minutes of
# retries.
OPTIONS = {
    "s3": {"config_kwargs": {"connect_timeout": 5, "read_timeout": 60,
                             "retries": {"max_attempts": 2}}},
    "gs": {"retries": 2},
}  # fmt: skip
# The run files mirrored both ways (`jaxpar.run.workdir.RUN_FILES` less what is handled apart).
RUN_FILES = (
    "config.json",
    "config.before-step-*.json",
    "metrics.jsonl",
    "metrics.rewound.jsonl",
    "skipped.jsonl",
    "events",
    "partition.json",
)


def is_url(path) -> bool:
    """Whether `path` names object storage (any ``scheme://``) rather than a local folder."""
    return path is not None and "://" in str(path)


def url_problem(url: str, flag: str = "--workdir") -> str | None:
    """Why `url` cannot be a run's storage, or None (the scheme and the bucket's name only)."""
    scheme, _, rest = url.partition("://")
    if scheme not in SCHEMES:
        return (f"{flag} {url}: unknown storage scheme {scheme}://; name a local folder, "
                "s3://BUCKET/PATH or gs://BUCKET/PATH")  # fmt: skip
    if not rest.split("/")[0]:
        return f"{flag} {url} names no bucket; write {scheme}://BUCKET/PATH"
    return None


def mirrors() -> Path:
    """The folder of the local mirrors (``$JAXPAR_MIRRORS``, else under the user's cache)."""
    if os.environ.get("JAXPAR_MIRRORS"):
        return Path(os.environ["JAXPAR_MIRRORS"]).expanduser()
    home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(home) / "jaxpar" / "workdirs"


class Remote:
    """A workdir on object storage and its local mirror."""

    def __init__(self, url: str, flag: str = "--workdir"):
        if problem := url_problem(url, flag):
            raise UserError(problem)
        if jax.process_count() > 1:
            raise UserError(f"{flag} {url}: object storage in a job of several processes is "
                            "not supported yet; use a shared folder")  # fmt: skip
        self.url, self.flag = url.rstrip("/"), flag
        self.scheme, _, self.key = self.url.partition("://")
        self.bucket = self.key.split("/")[0]
        self.fs = _filesystem(self.scheme)
        digest = hashlib.sha256(self.url.encode()).hexdigest()[:12]
        self.mirror = mirrors() / f"{self.bucket}-{digest}"

    def check(self) -> None:
        """Raise a `UserError` naming the bucket and the endpoint if the store cannot be read."""
        if self.scheme == "s3":
            import botocore.session

            if botocore.session.get_session().get_credentials() is None:
                raise UserError(
                    f"{self.flag} {self.url}: no AWS credentials found; set "
                    "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
                )
        if self.scheme == "gs" and not os.environ.get("STORAGE_EMULATOR_HOST"):
            import google.auth

            try:
                google.auth.default()
            except google.auth.exceptions.DefaultCredentialsError:
                raise UserError(
                    f"{self.flag} {self.url}: no Google credentials found; run `gcloud auth "
                    "application-default login` or set GOOGLE_APPLICATION_CREDENTIALS"
                ) from None
        try:
            self.fs.ls(self.bucket)
        except FileNotFoundError:
            raise UserError(f"{self.flag} {self.url}: bucket {self.bucket} does not exist at "
                            f"{self.endpoint()}; create it first") from None  # fmt: skip
        except Exception as e:  # noqa: BLE001 - any failure to list means no usable store
            raise UserError(
                f"{self.flag} {self.url}: cannot reach bucket {self.bucket} at "
                f"{self.endpoint()} ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
            ) from None

    def endpoint(self) -> str:
        if self.scheme == "s3":
            return os.environ.get("AWS_ENDPOINT_URL") or "AWS S3 (AWS_ENDPOINT_URL unset)"
        return os.environ.get("STORAGE_EMULATOR_HOST") or "Google Cloud Storage"

    def pull(self, into: Path | None = None, items: tuple | None = None) -> Path:
        """Rebuild the local mirror (or fill the folder `into`, for a reader) from the store:
        the run files and every complete step (of each, only the files and the subfolders
        `items` names, if given). Returns the folder."""
        self.check()
        into = into or self.mirror
        if into == self.mirror and self.mirror.exists():  # a cache: the store is the truth
            shutil.rmtree(self.mirror)
        into.mkdir(parents=True, exist_ok=True)
        for name in self.names():
            if any(fnmatch.fnmatch(name, p) for p in RUN_FILES):
                self._copy(self.fs.get, f"{self.key}/{name}", str(into / name))
        for step in self.steps():
            remote, local = f"{self.key}/checkpoints/{step}", into / "checkpoints" / str(step)
            if items is None:
                self._copy(self.fs.get, remote, str(local))
                continue
            for entry in self.fs.ls(remote, detail=True):
                name = entry["name"].rsplit("/", 1)[-1]
                if entry["type"] != "directory" or name in items:
                    self._copy(self.fs.get, entry["name"], str(local / name))
        return into

    def _copy(self, how, source: str, dest: str) -> None:
        """`how` (get or put) a file, or a folder's contents into `dest` (fsspec copies a folder
        into an existing destination as a subfolder unless the source ends in a slash)."""
        folder = self.fs.isdir(source) if how == self.fs.get else Path(source).is_dir()
        how(source + "/" if folder else source, dest, recursive=folder)

    def names(self) -> list[str]:
        """The names in the workdir on the store (none before its first upload)."""
        if not self.fs.exists(self.key):
            return []
        return [p.rsplit("/", 1)[-1] for p in self.fs.ls(self.key, detail=False)]

    def steps(self) -> list[int]:
        """The complete steps on the store (those with the marker), oldest first."""
        folder = f"{self.key}/checkpoints"
        if not self.fs.exists(folder):
            return []
        names = [p.rsplit("/", 1)[-1] for p in self.fs.ls(folder, detail=False)]
        steps = [int(n) for n in names if n.isdigit()]
        return sorted(s for s in steps if self.fs.exists(f"{folder}/{s}/{COMMITTED}"))

    def push(self, keep: int) -> None:
        """Upload the mirror's run files and its complete steps the store lacks; delete the
        store's steps older than its last `keep`."""
        for name in sorted(p.name for p in self.mirror.iterdir()):
            if any(fnmatch.fnmatch(name, p) for p in RUN_FILES):
                self._copy(self.fs.put, str(self.mirror / name), f"{self.key}/{name}")
        local = self.mirror / "checkpoints"
        mine = sorted(int(p.name) for p in local.iterdir() if p.name.isdigit()) if (
            local.is_dir()) else []  # fmt: skip
        stored = self.steps()
        for step in (s for s in mine if s not in stored):
            remote = f"{self.key}/checkpoints/{step}"
            if self.fs.exists(remote):  # an upload cut short: its files, never its marker
                self.fs.rm(remote, recursive=True)
            self._copy(self.fs.put, str(local / str(step)), remote)
            self.fs.pipe(f"{remote}/{COMMITTED}", b"")  # the step is complete from here on
            stored.append(step)
        for step in sorted(stored)[:-keep]:
            remote = f"{self.key}/checkpoints/{step}"
            self.fs.rm(f"{remote}/{COMMITTED}")  # incomplete from here on, then gone
            self.fs.rm(remote, recursive=True)

    def move_aside(self, moved: Path) -> None:
        """Move on the store what `jaxpar.run.workdir.move_aside` moved in the mirror (the
        files now in `moved`) into the same ``previous-<date-time>/`` folder."""
        for name in sorted(p.name for p in moved.iterdir()):
            source = f"{self.key}/{name}"
            if not self.fs.exists(source):
                continue
            files = self.fs.find(source)  # a file, or every file under a folder
            for f in files:
                self.fs.copy(f, f"{self.key}/{moved.name}/{name}{f[len(source) :]}")
            # Markers go first: a move cut short leaves no step that looks complete.
            self.fs.rm(sorted(files, key=lambda f: not f.endswith(COMMITTED)))


@contextlib.contextmanager
def readable(path: str, flag: str, items: tuple | None = None):
    """A local folder to read the workdir `path` from: itself, or for a URL a temporary copy of
    its run files and complete steps (`Remote.pull`'s `items`), removed afterwards."""
    if not is_url(path):
        yield Path(path)
        return
    remote = Remote(path, flag)
    with tempfile.TemporaryDirectory(prefix="jaxpar-read-") as tmp:
        yield remote.pull(Path(tmp) / remote.url.rsplit("/", 1)[-1], items)


def _filesystem(scheme: str):
    import fsspec

    try:
        return fsspec.filesystem(scheme, skip_instance_cache=True, use_listings_cache=False,
                                 **OPTIONS[scheme])  # fmt: skip
    except ImportError:
        raise UserError(f"{scheme}:// needs the {SCHEMES[scheme]} package: "
                        f"pip install {SCHEMES[scheme]}") from None  # fmt: skip
