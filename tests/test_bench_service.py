"""benchmarks/bench_service.py: the load test itself, small (4 clients x 3 s on tiny-llama, a generator trained
for a few steps), with its two SIGKILLs and restarts: no unexpected error and no acknowledged stored adapter
lost. Plus the checks' own ability to fail (a lost adapter, a bad zip, a 500) without a server."""

from __future__ import annotations

import asyncio
import io
import json
import sys
import zipfile
from pathlib import Path

import httpx
import pytest
from test_generator import SMALL, _clustered_library

from loramint.training.config import GeneratorTrainConfig
from loramint.training.generator import train_generator

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_service  # noqa: E402
from bench_service import LoadConfig, LoadTest, run_load_test  # noqa: E402


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_service")
    _clustered_library(root / "lib").close()
    config = GeneratorTrainConfig(
        library=str(root / "lib"),
        out=str(root / "generator"),
        model=SMALL,
        steps=6,
        batch_size=8,
        top_k=3,
        val_tasks=0,
    )
    train_generator(config, progress=False)
    return root


def test_load_test_survives_sigkill_without_losing_stored_adapters(tiny_world):
    library = tiny_world / "lib"
    before = sorted(p.name for p in (library / "experts").iterdir())
    cfg = LoadConfig(
        library=str(library),
        generator=str(tiny_world / "generator"),
        base_model="tiny-llama",
        clients=4,
        duration_s=3.0,
        max_tokens=4,
        store_fraction=0.5,
        mint_clients=2,
        mint_duration_s=2.0,
        checked_mints=3,
        startup_timeout_s=180,
        server_env={"OMP_NUM_THREADS": "1"},
    )
    result = run_load_test(cfg)
    assert result["unexpected_errors"] == 0, (result["unexpected"], result["server_log_tail"])
    assert result["mint_only"]["ok"] >= 1 and result["mint_p99_ms"] is not None and result["rss_rest_mb"] > 0
    assert result["checked_mints"]["ok"] == 3 and result["checked_mint_p50_ms"] > 0
    assert 0 <= result["checked_mints"]["fell_back"] <= 3
    assert result["stored_acknowledged"] >= 1  # the check is not vacuous
    assert result["stored_lost"] == 0 and result["stored_changed"] == 0, result["durability"]
    assert result["stored_not_retrievable"] == 0, result["durability"]
    assert [k["why"] for k in result["server"]["kills"]] == [
        "during the load",
        "at the end of the load, under load",
    ]
    assert len(result["server"]["starts"]) == 3 and result["load_s"] >= 2.5
    for name in ("mint", "retrieve", "completions"):
        assert result["endpoints"][name]["ok"] >= 1, result["endpoints"]
    assert result["mint_p50_ms"] > 0 and result["completions_tokens_per_s"] > 0
    assert result["completion_tokens"] == result["endpoints"]["completions"]["completion_tokens"]
    assert result["machine"]["cores"] and "seconds_to_first_adapter" in result
    # the real library was copied, never written
    assert sorted(p.name for p in (library / "experts").iterdir()) == before


class _Fake:
    """A LoadTest wired to an in-process fake server (httpx.MockTransport): no process, no kill."""

    def __init__(self, handler) -> None:
        cfg = LoadConfig(library="unused", generator=None, clients=1)
        self.test = LoadTest(cfg, Path("/nonexistent"))
        self.test.http = httpx.AsyncClient(base_url="http://fake", transport=httpx.MockTransport(handler))


def _peft_zip(members=("a/adapter_config.json", "a/adapter_model.safetensors")) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name in members:
            data = b'{"base_model_name_or_path": "x"}' if name.endswith(".json") else b"\0" * 64
            archive.writestr(name, data)
    return buffer.getvalue()


def test_the_durability_check_can_fail():
    """An id the restarted server does not know, one whose zip is broken, one the index does not return."""

    def handler(request: httpx.Request) -> httpx.Response:
        adapter_id = request.url.path.split("/")[3] if request.method == "GET" else None
        if request.method == "POST":  # retrieve: returns nothing for "unindexed"
            family = request.read().decode()
            return httpx.Response(200, json={"data": [] if "unindexed" in family else [{"id": "ok"}]})
        if adapter_id == "gone":
            return httpx.Response(404, json={"error": {"message": "not found"}})
        if request.url.path.endswith("/download"):
            return httpx.Response(200, content=b"not a zip" if adapter_id == "broken" else _peft_zip())
        return httpx.Response(200, json={"id": adapter_id, "stored": True, "content_hash": "h"})

    fake = _Fake(handler)
    for adapter_id in ("ok", "gone", "broken", "unindexed"):
        fake.test.acknowledged[adapter_id] = {"content_hash": "h", "description": adapter_id}
    result = asyncio.run(fake.test.check_stored())
    assert result["stored_acknowledged"] == 4 and result["stored_lost"] == 2
    assert sorted(x["id"] for x in result["lost"]) == ["broken", "gone"]
    assert result["not_retrievable"] == ["unindexed"]
    assert bench_service._zip_problem(_peft_zip()) is None
    assert "zip members" in bench_service._zip_problem(_peft_zip(("a/adapter_model.bin",)))


def test_a_checked_mint_without_its_check_is_an_error():
    """Solved examples must come back checked: an answer without `metrics.minted.check` or a 4xx counts as
    unexpected and is left out of the latency; a fallback is counted as one."""
    answers = iter(
        [
            {"metrics": {"minted": {"check": {}, "fell_back": True}}},
            {"metrics": {"minted": {}}},
            422,
            {"metrics": {"minted": {"check": {}, "fell_back": False}}},
        ]
    )

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.read())
        assert len(body["examples"]) == bench_service.CHECK_SHOTS and body["store"] is False
        assert all(set(e) == {"input", "output"} for e in body["examples"])
        answer = next(answers)
        if answer == 422:
            return httpx.Response(422, json={"error": {"message": "bad"}})
        return httpx.Response(201, json=answer)

    test = _Fake(handler).test
    test.cfg.checked_mints = 4
    test.keys = ["k"]
    result = asyncio.run(test.checked_phase())
    assert result["ok"] == 2 and result["fell_back"] == 1 and result["p50_ms"] is not None
    assert [u["status"] for u in test.unexpected] == ["unchecked", "422"]


def test_errors_count_unless_the_benchmark_killed_the_server():
    """A 500 and a transport error are unexpected, a 429 is not; a transport error of a request the benchmark's
    own SIGKILL interrupted (the server epoch moved on) is counted apart."""
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) == 4:
            raise httpx.ConnectError("refused", request=request)
        if len(calls) == 5:
            test.epoch += 1  # what kill_server does while the request is in flight
            test.stopping = True
            raise httpx.ReadError("connection reset", request=request)
        return httpx.Response([500, 429, 200][len(calls) - 1], json={"data": []})

    test = _Fake(handler).test
    test.cfg.mix = {"retrieve": 1.0}

    async def run_client():
        test.go()
        await asyncio.wait_for(test.client(0), 10)

    asyncio.run(run_client())
    assert [s.status for s in test.samples] == ["500", "429", "200", "exc:ConnectError", "killed:ReadError"]
    assert [u["status"] for u in test.unexpected] == ["500", "exc:ConnectError"]
    assert test.interrupted == 1 and [s.ok for s in test.samples].count(True) == 1


def test_the_fault_suite_runs_clean_on_a_tiny_server(tiny_world, tmp_path):
    """benchmarks/faults.py, small (tiny-llama, 1 kill round, 2 s soak): every class runs, the server
    answers every attack as documented, with no 5xx, no dropped connection and no lost write."""
    import json
    import subprocess

    out = tmp_path / "faults.json"
    command = [
        sys.executable,
        str(Path(bench_service.__file__).with_name("faults.py")),
        "--library",
        str(tiny_world / "lib"),
        "--generator",
        str(tiny_world / "generator"),
        "--base-model",
        "tiny-llama",
        "--kill-rounds",
        "1",
        "--soak",
        "2",
        "--warmup",
        "1",
        "--mutations",
        "20",
        "--streams",
        "2",
        "--races",
        "2",
        "--out",
        str(out),
    ]
    run = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["cases"] >= 140 and result["kill9_rounds"] == 1
    assert set(result["classes"]) >= {
        "bad_uploads",
        "hostile_patterns",
        "requests",
        "auth",
        "mutated",
        "streams",
        "races",
    }
    assert (result["server_errors"], result["dropped_connections"], result["lost_writes"]) == (0, 0, 0), (
        result["failures"]
    )
    assert result["not_as_documented"] == 0, result["failures"]
