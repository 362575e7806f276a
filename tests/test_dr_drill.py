"""The disaster-recovery drill of docs/operations.md, run as a test: a serving
rag-grpc with a few hundred documents under load (a writer and readers) is
backed up through `rag-grpc backup`, its data dir is destroyed, the archive is
restored with `rag-grpc restore` into a new dir, and a new `rag-grpc serve`
answers the same Search and Get results and takes writes. It prints the
recovery time (RTO) and the writes lost after the snapshot point (RPO); run
with `pytest -s` to see them. Timings are measured, never asserted."""

from __future__ import annotations

import os
import random
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from pydoc_data.topics import topics

import pytest

from rag_grpc.client import RagClient, RpcError
from rag_grpc.documents import Document, Hit
from rag_grpc.filters import Equals
from tests.cli.command import cli
from tests.conftest import ServerProcess, ServerThread

pytestmark = pytest.mark.slow

DOCS, CATALOG, STREAM = "pydoc", "catalog", "stream"
MODES = ("dense", "hybrid", "lexical")
QUERIES = {
    DOCS: [
        "the with statement and context managers",
        "catching an exception",
        "yield in a generator",
    ],
    CATALOG: ["a warm wool scarf", "waterproof leather boots", "ceramic coffee mug"],
}
# The writer updates a fixed set of documents in their own namespace, always
# with the same number of words and none of the queries' words. The lexical
# index is one FTS5 table for every namespace, so new documents anywhere would
# change BM25's row count and average length, and with them the lexical and
# hybrid scores in the other namespaces: the restored archive holds some of
# the writes made during the backup, so its scores would differ from the ones
# read before it. Updates like these leave every statistic that a query in the
# other namespaces uses as it was, and the answers can be compared exactly.
STREAM_SLOTS = 20


def pydoc_documents() -> list[Document]:
    """160 paragraphs of CPython's own help topics; every third has no metadata."""
    paragraphs = [
        (name, part, text.strip())
        for name, body in sorted(topics.items())
        for part, text in enumerate(body.split("\n\n"))
        if 200 <= len(text.strip()) <= 600 and not text.startswith(" ")
    ]
    chosen = paragraphs[:: max(1, len(paragraphs) // 160)][:160]
    return [
        Document(
            f"{name}-{part}",
            text,
            {} if i % 3 == 0 else {"topic": name, "part": part, "reviewed": i % 2 == 0},
        )
        for i, (name, part, text) in enumerate(chosen)
    ]


def catalog_documents() -> list[Document]:
    """140 seeded product descriptions with metadata."""
    rng = random.Random(17)
    colours = ["red", "navy", "green", "grey", "mustard", "black", "white"]
    items = {
        "scarf": ("wool", "a warm winter scarf, knitted by hand"),
        "boots": ("leather", "waterproof walking boots with a rubber sole"),
        "mug": ("ceramic", "a coffee mug that keeps its glaze in the dishwasher"),
        "lamp": ("brass", "a desk lamp with an adjustable arm"),
        "backpack": ("canvas", "a backpack with a padded laptop sleeve"),
        "kettle": ("steel", "an electric kettle that boils a litre in two minutes"),
        "blanket": ("cotton", "a picnic blanket that folds into its own pouch"),
    }
    documents = []
    for i in range(140):
        item = rng.choice(sorted(items))
        material, blurb = items[item]
        colour = rng.choice(colours)
        price = rng.randint(5, 200)
        documents.append(
            Document(
                f"sku-{i:04d}",
                f"A {colour} {material} {item}: {blurb}. Costs {price} euros.",
                {"item": item, "colour": colour, "price": price, "in_stock": i % 4 != 0},
            )
        )
    return documents


def stream_document(seq: int) -> Document:
    """The writer's seq-th write: an update of one slot, with the same word count."""
    slot = seq % STREAM_SLOTS
    return Document(
        f"slot-{slot:02d}",
        f"Stream slot {slot:02d} entry {seq:06d} reading {seq * 7 % 1000:03d} units",
        {"seq": seq},
    )


Ranking = list[tuple[str, str, float]]
Answers = dict[tuple[str, str, str], Ranking]


def ranking(hits: list[Hit]) -> Ranking:
    """(document, chunk, score to 4 places) of each hit, in order."""
    return [(h.document_id, h.chunk_id, round(h.score, 4)) for h in hits]


def answers(client: RagClient) -> Answers:
    """Every drill query in every mode: (document, chunk, score rounded) per hit."""
    found: Answers = {}
    for namespace, queries in QUERIES.items():
        for query in queries:
            for mode in MODES:
                hits = client.search(query, k=5, namespace=namespace, mode=mode)
                found[namespace, query, mode] = ranking(hits)
    return found


@dataclass
class Load:
    """A writer upserting one document at a time and readers searching, on their
    own clients, until stopped; every acknowledged write is kept with its time."""

    target: str
    first_seq: int
    acked: list[tuple[int, float]] = field(default_factory=list)
    searches: int = 0
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self, readers: int, expected: Answers) -> None:
        self.threads = [threading.Thread(target=self._write)] + [
            threading.Thread(target=self._read, args=(expected,)) for _ in range(readers)
        ]
        for thread in self.threads:
            thread.start()

    def last_acked(self) -> int:
        with self.lock:
            return self.acked[-1][0] if self.acked else self.first_seq - 1

    def join(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)

    def _write(self) -> None:
        seq = self.first_seq
        with RagClient(self.target, timeout=60) as client:
            while not self.stop.is_set():
                try:
                    client.upsert([stream_document(seq)], STREAM)
                except RpcError as exc:
                    with self.lock:
                        self.failures.append(f"upsert {seq}: {exc}")
                    return
                with self.lock:
                    self.acked.append((seq, time.monotonic()))
                seq += 1

    def _read(self, expected: Answers) -> None:
        keys = list(expected)
        with RagClient(self.target, timeout=60) as client:
            i = 0
            while not self.stop.is_set():
                namespace, query, mode = keys[i % len(keys)]
                try:
                    hits = client.search(query, k=5, namespace=namespace, mode=mode)
                except RpcError as exc:
                    with self.lock:
                        self.failures.append(f"search {query!r} {mode}: {exc}")
                    return
                with self.lock:
                    self.searches += 1
                    if ranking(hits) != expected[namespace, query, mode]:
                        self.failures.append(f"search {query!r} {mode} changed under load")
                i += 1


def get_all(client: RagClient, documents: dict[str, list[Document]]) -> dict[str, list[Document]]:
    """Get of every given document, per namespace; fails on any missing id."""
    stored = {}
    for namespace, docs in documents.items():
        found, missing = client.get([d.id for d in docs], namespace)
        assert not missing, (namespace, missing)
        stored[namespace] = found
    return stored


@pytest.fixture
def key(tmp_path: Path) -> Path:
    """A backup key file: 32 random bytes, owner-only (a readable key is refused)."""
    path = tmp_path / "backup.key"
    path.write_bytes(os.urandom(32))
    path.chmod(0o600)
    return path


def first_search(target: str, timeout: float = 120) -> float:
    """Poll until the server answers a Search; the monotonic time it did."""
    deadline = time.monotonic() + timeout
    with RagClient(target, timeout=5) as client:
        while True:
            try:
                client.search(QUERIES[DOCS][0], k=5, namespace=DOCS)
                return time.monotonic()
            except RpcError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


def test_disaster_recovery_drill(
    start_server: Callable[..., ServerThread],
    server_process: Callable[..., ServerProcess],
    tmp_path: Path,
    key: Path,
) -> None:
    live_dir = tmp_path / "live"
    live = start_server(live_dir, backup_key_file=key)
    corpus = {DOCS: pydoc_documents(), CATALOG: catalog_documents()}
    with RagClient(live.target, timeout=120) as client:
        for namespace, docs in corpus.items():
            client.upsert(docs, namespace)
        # Every slot exists before the baseline (see STREAM_SLOTS).
        client.upsert([stream_document(seq) for seq in range(STREAM_SLOTS)], STREAM)
        expected = answers(client)
        expected_docs = get_all(client, corpus)
        expected_counts = {ns.name: ns.documents for ns in client.stats().namespaces}
        navy = client.search(
            "a warm wool scarf", k=5, namespace=CATALOG, filter=Equals("colour", "navy")
        )
    assert all(expected.values()), [q for q, hits in expected.items() if not hits]
    assert navy and all(h.metadata["colour"] == "navy" for h in navy)

    # Under load: the writer updates the stream slots, two readers search.
    load = Load(live.target, first_seq=STREAM_SLOTS)
    load.start(readers=2, expected=expected)
    archive = tmp_path / "drill.rag"
    try:
        while load.last_acked() < STREAM_SLOTS + 20 and not load.failures:
            time.sleep(0.05)
        acked_before_backup = load.last_acked()
        backup_began = time.monotonic()
        made = cli("backup", "--target", live.target, "--out", str(archive))
        backup_ended = time.monotonic()
        # The disaster comes a little later: writes go on after the last backup.
        acked_by_backup_end = load.last_acked()
        while load.last_acked() < acked_by_backup_end + 30 and not load.failures:
            time.sleep(0.05)
    finally:
        load.join()
    assert made.returncode == 0, made.stderr
    assert "encrypted (AES-256-GCM)" in made.stdout
    assert not load.failures, load.failures[:5]
    blob = archive.read_bytes()
    assert corpus[CATALOG][0].text.encode() not in blob

    # The disaster: the server goes down and its data dir is lost.
    live.stop()
    shutil.rmtree(live_dir)
    assert not live_dir.exists()

    # Recovery: restore into a new dir, start a new server, wait for a Search.
    restored_dir = tmp_path / "restored"
    restore_began = time.monotonic()
    done = cli("restore", str(archive), "--data-dir", str(restored_dir), "--key-file", str(key))
    restored_at = time.monotonic()
    assert done.returncode == 0, done.stderr
    recovered = server_process(restored_dir)
    listening_at = time.monotonic()
    answering_at = first_search(recovered.target)

    with RagClient(recovered.target, timeout=120) as client:
        # The same answers and documents as before the backup began.
        assert answers(client) == expected
        assert get_all(client, corpus) == expected_docs
        counts = {ns.name: ns.documents for ns in client.stats().namespaces}
        assert counts == expected_counts
        # Metadata came back too: a filtered search finds the same hits.
        again = client.search(
            "a warm wool scarf", k=5, namespace=CATALOG, filter=Equals("colour", "navy")
        )
        assert ranking(again) == ranking(navy)
        assert [h.metadata for h in again] == [h.metadata for h in navy]

        # The stream is one point in time: the snapshot point is the last write
        # it holds, every earlier write is in it and no later one is.
        slots, missing = client.get([f"slot-{s:02d}" for s in range(STREAM_SLOTS)], STREAM)
        assert not missing
        held = {doc.id: doc for doc in slots}
        snapshot_point = max(int(doc.metadata["seq"]) for doc in slots)
        for slot in range(STREAM_SLOTS):
            latest = max(s for s in range(snapshot_point + 1) if s % STREAM_SLOTS == slot)
            assert held[f"slot-{slot:02d}"] == stream_document(latest)
        # RPO: every write acknowledged before the backup began survives; of
        # those acknowledged after the snapshot point, none does.
        assert snapshot_point >= acked_before_backup
        acked = load.acked
        lost = [(seq, at) for seq, at in acked if seq > snapshot_point]
        lost_during_backup = [seq for seq, at in lost if at <= backup_ended]
        kept_during_backup = [
            seq for seq, at in acked if acked_before_backup < seq <= snapshot_point
        ]
        after_backup = [seq for seq, at in acked if at > backup_ended]
        assert after_backup and min(after_backup) > snapshot_point

        # The recovered server takes writes and finds them.
        note = Document("drill-note", "Recovered from the drill archive in one piece.", {})
        assert client.upsert([note], CATALOG).documents == 1
        assert [h.document_id for h in client.search(note.text, k=1, namespace=CATALOG)] == [
            "drill-note"
        ]
        assert client.get(["drill-note"], CATALOG)[0] == [note]
    recovered.stop()

    print(
        f"\nDR drill: {sum(len(d) for d in corpus.values())} documents in 2 namespaces "
        f"+ {STREAM_SLOTS} streamed slots, archive {len(blob) / 1e6:.1f} MB\n"
        f"  backup under load: {backup_ended - backup_began:.2f} s; "
        f"{len(acked)} writes acknowledged, {load.searches} searches, no failures\n"
        f"  RTO {answering_at - restore_began:.2f} s = restore "
        f"{restored_at - restore_began:.2f} s + serve until listening "
        f"{listening_at - restored_at:.2f} s + first Search "
        f"{answering_at - listening_at:.2f} s\n"
        f"  RPO: streamed writes acknowledged before the backup began: "
        f"{acked_before_backup - STREAM_SLOTS + 1}, all restored; during the backup: "
        f"{len(kept_during_backup)} restored, {len(lost_during_backup)} lost; "
        f"after it: {len(after_backup)} lost "
        f"(all {len(lost)} acknowledged after the snapshot point)"
    )
