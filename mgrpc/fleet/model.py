"""The fleet model: devices, uploaded bundles and rollouts, persisted through SQLAlchemy Core in
SQLite (one file, the default) or PostgreSQL (several worker processes); bundles are stored in the
database too, named by their SHA-256, so an upload of the same file is the same bundle and every
worker can serve it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mgrpc.fleet.errors import FleetError
from mgrpc.fleet.rollout import Job, Rollout
from updater.errors import UpdaterError
from updater.manifest import read_manifest

__all__ = ["BundleInfo", "DeviceRecord", "FleetDB", "FleetError", "bundle_info"]

log = logging.getLogger("mgrpc.fleet")

LEGACY_TABLES = ("devices", "bundles", "rollouts")  # schema 1 (see mgrpc.fleet.sql.SCHEMA_VERSION)


@dataclass
class DeviceRecord:
    """What the dashboard knows of a device (seen over MQTT, or added by URL)."""

    id: str
    arch: str = ""
    app: str = ""
    version: str = ""
    build_id: str = ""
    committed: bool = True
    online: bool = False
    source: str = "mqtt"  # "mqtt" or "url"
    presence: str = ""  # "status": <id>/status with a last will; "shadow": seen only by its shadow requests
    url: str = ""  # RPC URL (mqtt://broker/<id>, ws://..., ...)
    last_seen: float = 0.0
    reverted: bool = False
    reason: str = ""  # the boot loader's word on the last boot (why it fell back, after a rollback)
    boots: int = 0  # the device's boot counter (MQTT status), tells a new boot from an old message
    reboot_pending: bool = False  # URL devices: the boot config already names another slot
    progress: dict[str, Any] = field(default_factory=dict)
    ota: dict[str, Any] = field(default_factory=dict)  # the shadow's reported.ota

    def to_json(self) -> dict[str, Any]:
        """For the dashboard and the database."""
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> DeviceRecord:
        """Inverse of :meth:`to_json` (unknown keys ignored)."""
        known = {k: v for k, v in obj.items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass(frozen=True)
class BundleInfo:
    """An uploaded fw.zip."""

    sha: str
    size: int
    name: str
    version: str
    arch: str
    build_id: str
    uploaded_at: float

    def to_json(self) -> dict[str, Any]:
        """For the dashboard and the database."""
        return asdict(self)


def bundle_info(data: bytes, *, filename: str = "fw.zip") -> BundleInfo:
    """Read a fw.zip's manifest; :class:`FleetError` if it is not a firmware bundle."""
    try:
        manifest = read_manifest(data)
    except UpdaterError as e:
        raise FleetError(f"not a firmware bundle: {e}") from None
    if not isinstance(manifest.get("version"), str):
        raise FleetError("not a firmware bundle: the manifest has no version")
    return BundleInfo(
        sha=hashlib.sha256(data).hexdigest(), size=len(data), name=filename,
        version=manifest["version"], arch=str(manifest.get("platform", "")),
        build_id=str(manifest.get("build_id", "")), uploaded_at=time.time(),
    )  # fmt: skip


class FleetDB:
    """Devices, bundles (with their bytes), rollouts and their jobs, and the workers' heartbeats, in
    SQLite (a path or ``":memory:"``) or PostgreSQL (a ``postgresql://`` URL); see :mod:`mgrpc.fleet.sql`.

    Read-modify-write goes through :meth:`locked_rollout` and :meth:`locked_job`: each is one
    transaction holding the row (PostgreSQL ``FOR UPDATE``; SQLite: the write lock), so several
    processes sharing the database move each job exactly once.

    A SQLite file of the first schema (mgrpc before the SQLAlchemy tables: ``devices``, ``bundles``,
    ``rollouts``, bundle bytes in ``<file>.bundles/``) is migrated when opened, in one transaction:
    its devices, bundles and rollouts are copied into the current tables and the old tables dropped
    (the ``.bundles`` directory is left for the user to delete). A database written by a newer
    schema than this code knows raises :class:`FleetError` saying what to do.
    """

    def __init__(self, target: str | Path) -> None:
        from mgrpc.fleet import sql

        self.target = str(target)
        self.sa = sql.sqlalchemy()
        self.engine = sql.make_engine(target)
        self.t = sql.TABLES
        self._sql = sql
        try:
            self._check_schema()
        except BaseException:
            self.engine.dispose()
            raise

    def _check_schema(self) -> None:
        """Refuse a newer schema, migrate schema 1, record the version."""
        tm = self.t["meta"]
        with self.engine.begin() as c:
            row = c.execute(self.sa.select(tm.c.value).where(tm.c.key == "schema")).first()
            found = row[0] if row else None
            if found is not None and (not str(found).isdigit() or int(found) > self._sql.SCHEMA_VERSION):
                raise FleetError(
                    f"{self.target}: this fleet database has schema {found}, written by a newer mgrpc than this one "
                    f"(which knows schema {self._sql.SCHEMA_VERSION}): upgrade mgrpc, or give --db another file"
                )
            if self.dialect == "sqlite":  # schema 1 was SQLite only (and a PostgreSQL "devices" is not ours)
                names = set(self.sa.inspect(c).get_table_names())
                legacy = [n for n in LEGACY_TABLES if n in names
                          and "doc" in {col["name"] for col in self.sa.inspect(c).get_columns(n)}]  # fmt: skip
                if legacy:
                    self._migrate_v1(c, legacy)
            if found != str(self._sql.SCHEMA_VERSION):
                self._upsert(c, "meta", {"key": "schema", "value": str(self._sql.SCHEMA_VERSION)}, ["key"])

    def _migrate_v1(self, c: Any, legacy: list[str]) -> None:
        """Copy schema 1's rows into the current tables (rows already there win) and drop its tables."""
        now = time.time()
        counts = dict.fromkeys(LEGACY_TABLES, 0)
        skipped: list[str] = []
        ins = self._sql.insert_ignore
        for table in legacy:
            key = "sha" if table == "bundles" else "id"
            for k, doc in c.exec_driver_sql(f"SELECT {key}, doc FROM {table}").all():
                try:
                    obj = json.loads(doc)
                    if table == "devices":
                        dev = DeviceRecord.from_json(obj)
                        c.execute(ins(self.t["devices"], self.engine).values(
                            id=dev.id, doc=json.dumps(dev.to_json()), mtime=now))  # fmt: skip
                    elif table == "bundles":
                        info = BundleInfo(**obj)
                        path = Path(self.target + ".bundles") / f"{k}.zip"
                        data = path.read_bytes()
                        if hashlib.sha256(data).hexdigest() != info.sha:
                            raise ValueError(f"{path} does not hold the bundle {info.sha}")
                        c.execute(ins(self.t["bundles"], self.engine).values(
                            sha=info.sha, doc=json.dumps(info.to_json()), data=data))  # fmt: skip
                    else:
                        r = Rollout.from_json(obj)
                        c.execute(ins(self.t["rollouts"], self.engine).values(
                            id=r.id, doc=self._rollout_doc(r), state=r.state, created_at=r.created_at))  # fmt: skip
                        self._put_jobs(c, r, list(r.jobs.values()))
                except (ValueError, KeyError, TypeError, OSError) as e:
                    skipped.append(f"{table} {k}: {e}")
                    continue
                counts[table] += 1
            c.exec_driver_sql(f"DROP TABLE {table}")
        log.warning("%s: migrated from the first fleet schema: %d devices, %d bundles, %d rollouts%s",
                    self.target, counts["devices"], counts["bundles"], counts["rollouts"],
                    "; not migrated: " + "; ".join(skipped) if skipped else "")  # fmt: skip
        if Path(self.target + ".bundles").is_dir():
            log.warning("%s.bundles/ is no longer used (bundles are in the database now): it may be deleted",
                        self.target)  # fmt: skip

    @property
    def dialect(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return str(self.engine.dialect.name)

    def close(self) -> None:
        """Release the connections."""
        self.engine.dispose()

    def _upsert(self, conn: Any, table: str, values: dict[str, Any], keys: list[str]) -> None:
        conn.execute(self._sql.upsert(self.t[table], self.engine, values, keys))

    # devices
    def save_device(self, dev: DeviceRecord) -> None:
        """Insert or update a device."""
        with self.engine.begin() as c:
            self._upsert(c, "devices", {"id": dev.id, "doc": json.dumps(dev.to_json()), "mtime": time.time()}, ["id"])

    def devices(self, *, since: float = 0.0) -> list[DeviceRecord]:
        """Every stored device (changed after ``since``)."""
        t = self.t["devices"]
        with self.engine.begin() as c:
            rows = c.execute(self.sa.select(t.c.doc).where(t.c.mtime > since)).all()
        return [DeviceRecord.from_json(json.loads(r[0])) for r in rows]

    # bundles
    def add_bundle(self, data: bytes, *, filename: str = "fw.zip") -> BundleInfo:
        """Store an uploaded bundle (validated); returns its info."""
        info = bundle_info(data, filename=filename)
        with self.engine.begin() as c:
            self._upsert(c, "bundles", {"sha": info.sha, "doc": json.dumps(info.to_json()), "data": data}, ["sha"])
        return info

    def bundles(self) -> list[BundleInfo]:
        """Every stored bundle, newest first."""
        t = self.t["bundles"]
        with self.engine.begin() as c:
            out = [BundleInfo(**json.loads(r[0])) for r in c.execute(self.sa.select(t.c.doc))]
        return sorted(out, key=lambda b: -b.uploaded_at)

    def bundle(self, sha: str) -> BundleInfo | None:
        """A bundle's info by SHA-256 (hex)."""
        t = self.t["bundles"]
        with self.engine.begin() as c:
            row = c.execute(self.sa.select(t.c.doc).where(t.c.sha == sha)).first()
        return BundleInfo(**json.loads(row[0])) if row else None

    def bundle_data(self, sha: str) -> bytes:
        """A bundle's bytes (:class:`FleetError` if unknown)."""
        t = self.t["bundles"]
        with self.engine.begin() as c:
            row = c.execute(self.sa.select(t.c.data).where(t.c.sha == sha)).first()
        if row is None:
            raise FleetError(f"unknown bundle {sha}")
        return bytes(row[0])

    # rollouts and jobs
    @staticmethod
    def _rollout_doc(r: Rollout) -> str:
        doc = r.to_json()
        for k in ("jobs", "summary", "failures"):
            doc.pop(k, None)
        return json.dumps(doc)

    def _put_jobs(self, c: Any, r: Rollout, jobs: list[Job]) -> None:
        now = time.time()
        seq = {d: i for i, d in enumerate(r.devices)}
        for j in jobs:
            self._upsert(c, "jobs", {"rollout": r.id, "device": j.device, "seq": seq.get(j.device, 0),
                                     "state": j.state, "owner": j.owner, "doc": json.dumps(j.to_json()),
                                     "mtime": now}, ["rollout", "device"])  # fmt: skip

    def save_rollout(self, r: Rollout) -> None:
        """Insert or update a rollout with all its jobs."""
        with self.engine.begin() as c:
            self._upsert(c, "rollouts", {"id": r.id, "doc": self._rollout_doc(r), "state": r.state,
                                         "created_at": r.created_at}, ["id"])  # fmt: skip
            self._put_jobs(c, r, list(r.jobs.values()))

    def _load(self, c: Any, rows: list[Any], *, lock: bool = False) -> list[Rollout]:
        out = []
        tj = self.t["jobs"]
        for row in rows:
            doc = json.loads(row[0])
            q = self.sa.select(tj.c.doc).where(tj.c.rollout == doc["id"]).order_by(tj.c.seq)
            if lock:
                q = self._sql.for_update(q, self.engine)
            doc["jobs"] = {j["device"]: j for j in (json.loads(x[0]) for x in c.execute(q))}
            out.append(Rollout.from_json(doc))
        return out

    def rollouts(self, *, unsettled_only: bool = False, limit: int = 0) -> list[Rollout]:
        """Stored rollouts with their jobs, oldest first (``limit``: only the newest so many)."""
        t = self.t["rollouts"]
        q = self.sa.select(t.c.doc).order_by(t.c.created_at.desc())
        if limit:
            q = q.limit(limit)
        with self.engine.begin() as c:
            rows = c.execute(q).all()
            rs = self._load(c, rows)
        if unsettled_only:
            rs = [r for r in rs if not (r.settled and r.state != "running")]
        return sorted(rs, key=lambda r: r.created_at)

    def rollout(self, rollout_id: str) -> Rollout | None:
        """One rollout with its jobs."""
        t = self.t["rollouts"]
        with self.engine.begin() as c:
            rows = c.execute(self.sa.select(t.c.doc).where(t.c.id == rollout_id)).all()
            rs = self._load(c, rows)
        return rs[0] if rs else None

    @contextlib.contextmanager
    def locked_rollout(self, rollout_id: str, *, light: bool = False) -> Iterator[Rollout | None]:
        """A transaction holding the rollout and its jobs: yields the stored rollout (None if unknown);
        what the caller changed in it (state, jobs) is written when the block ends without an error.

        ``light`` (starting queued jobs, the frequent case): only the rollout's row is held, and the
        jobs are read from their state and owner columns (no job document is parsed: a pump costs
        little even with thousands of jobs). What the caller changed in a job it moved (a new
        state) is then written, if the job's stored state is still the one read (checked under its
        row lock; another worker may have moved a started job meanwhile), and afterwards the
        rollout's ``jobs`` hold just the jobs written, as stored."""
        t = self.t["rollouts"]
        with self.engine.begin() as c:
            q = self._sql.for_update(self.sa.select(t.c.doc).where(t.c.id == rollout_id), self.engine)
            rows = c.execute(q).all()
            if not rows:
                yield None
                return
            if not light:
                r = self._load(c, rows, lock=True)[0]
                before = {d: j.to_json() for d, j in r.jobs.items()}
                state = r.state
                yield r
                if r.state != state:
                    c.execute(self.sa.update(t).where(t.c.id == r.id).values(doc=self._rollout_doc(r), state=r.state))
                self._put_jobs(c, r, [j for d, j in r.jobs.items() if j.to_json() != before.get(d)])
                return
            r = self._load_states(c, rows[0])
            read = {d: (j.state, j.owner) for d, j in r.jobs.items()}
            state = r.state
            yield r
            if r.state != state:
                c.execute(self.sa.update(t).where(t.c.id == r.id).values(doc=self._rollout_doc(r), state=r.state))
            moved = [j for d, j in r.jobs.items() if j.state != read[d][0]]
            r.jobs = {}
            tj = self.t["jobs"]
            now = time.time()
            for j in moved:
                st, owner = read[j.device]
                was = Job.from_json({"device": j.device, "state": st, "owner": owner}).to_json()
                q = self.sa.select(tj.c.doc).where(tj.c.rollout == r.id, tj.c.device == j.device)
                row = c.execute(self._sql.for_update(q, self.engine)).first()
                stored = json.loads(row[0]) if row else None
                if stored is None or stored.get("state", "queued") != was["state"]:
                    continue  # moved meanwhile: the caller's change was made on a stale state
                new = Job.from_json({**stored, **{k: v for k, v in j.to_json().items() if v != was[k]}})
                c.execute(self.sa.update(tj).where(tj.c.rollout == r.id, tj.c.device == j.device).values(
                    state=new.state, owner=new.owner, doc=json.dumps(new.to_json()), mtime=now))  # fmt: skip
                r.jobs[j.device] = new

    def _load_states(self, c: Any, row: Any) -> Rollout:
        """A rollout whose jobs carry only their state and owner (see :meth:`locked_rollout`)."""
        tj = self.t["jobs"]
        doc = json.loads(row[0])
        q = self.sa.select(tj.c.device, tj.c.state, tj.c.owner).where(tj.c.rollout == doc["id"]).order_by(tj.c.seq)
        doc["jobs"] = {d: {"device": d, "state": st, "owner": o} for d, st, o in c.execute(q)}
        return Rollout.from_json(doc)

    @contextlib.contextmanager
    def locked_job(self, rollout_id: str, device: str) -> Iterator[Job | None]:
        """A transaction holding one job: yields it (None if unknown); written back if changed."""
        tj = self.t["jobs"]
        with self.engine.begin() as c:
            q = self.sa.select(tj.c.doc).where(tj.c.rollout == rollout_id, tj.c.device == device)
            row = c.execute(self._sql.for_update(q, self.engine)).first()
            if row is None:
                yield None
                return
            job = Job.from_json(json.loads(row[0]))
            before = job.to_json()
            yield job
            if job.to_json() != before:
                c.execute(self.sa.update(tj).where(tj.c.rollout == rollout_id, tj.c.device == device).values(
                    state=job.state, owner=job.owner, doc=json.dumps(job.to_json()), mtime=time.time()))  # fmt: skip

    def active_jobs(self, device: str) -> list[tuple[str, Job]]:
        """``(rollout id, job)`` of the device's started jobs that may still change, newest rollout first."""
        tj, tr = self.t["jobs"], self.t["rollouts"]
        q = (self.sa.select(tj.c.rollout, tj.c.doc).join(tr, tr.c.id == tj.c.rollout)
             .where(tj.c.device == device, tj.c.state.notin_(("queued", "skipped", "failed", "rolled_back")))
             .order_by(tr.c.created_at.desc()))  # fmt: skip
        with self.engine.begin() as c:
            return [(r[0], Job.from_json(json.loads(r[1]))) for r in c.execute(q)]

    def last_change(self) -> float:
        """When a job or a device last changed (any process)."""
        tj, td = self.t["jobs"], self.t["devices"]
        with self.engine.begin() as c:
            a = c.execute(self.sa.select(self.sa.func.max(tj.c.mtime))).scalar() or 0.0
            b = c.execute(self.sa.select(self.sa.func.max(td.c.mtime))).scalar() or 0.0
        return float(max(a, b))

    # workers
    def heartbeat(self, worker: str, info: str = "") -> None:
        """Say ``worker`` is alive now."""
        with self.engine.begin() as c:
            self._upsert(c, "workers", {"id": worker, "seen_at": time.time(), "info": info}, ["id"])

    def live_workers(self, max_age_s: float) -> set[str]:
        """Workers heard from within ``max_age_s``."""
        t = self.t["workers"]
        with self.engine.begin() as c:
            rows = c.execute(self.sa.select(t.c.id).where(t.c.seen_at >= time.time() - max_age_s)).all()
        return {r[0] for r in rows}

    def forget_worker(self, worker: str) -> None:
        """A worker that stops cleanly leaves (its jobs and devices are taken over at once; leases of
        earlier versions it held are dropped)."""
        t, tl = self.t["workers"], self.t["leases"]
        with self.engine.begin() as c:
            c.execute(self.sa.delete(t).where(t.c.id == worker))
            c.execute(self.sa.delete(tl).where(tl.c.holder == worker))
