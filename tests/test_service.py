"""service/: the HTTP API through FastAPI's TestClient on tiny-llama, a 14-expert clustered library and a
generator trained for a few steps (its quality is not under test); plus one real uvicorn process driven by the
official `openai` client."""

from __future__ import annotations

import copy
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save
from test_generator import SMALL, _clustered_library

from loramint.adapters import CONFIG_FILE, WEIGHTS_FILE, LoraAdapter, apply_lora
from loramint.errors import AlreadyExistsError, GeneratorError, NotFoundError
from loramint.gen.minter import Minter
from loramint.runtime.runtime import Runtime
from loramint.service import ServiceConfig, create_app
from loramint.service.core import CompletionJob, CompletionResult, _StopFilter
from loramint.training.config import GeneratorTrainConfig
from loramint.training.generator import train_generator

KEY = "test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
SNAPSHOT = Path(__file__).with_name("service_openapi.json")
BASE = "loramint/tiny-llama"
TARGETS = ("q_proj", "v_proj", "up_proj", "down_proj")
STRONG = LoraAdapter.random("tiny-llama", r=4, std=0.3, seed=3, target_modules=TARGETS)
"""Large enough to change tiny-llama's greedy text (the library's experts barely move it)."""


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny):
    """The clustered library, a generator trained 6 steps on it, and a runtime on tiny-llama."""
    root = tmp_path_factory.mktemp("service")
    library = _clustered_library(root / "lib")
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
    library.add(STRONG, id="strong", name="strong", description="Speak in riddles.", family="test")
    minter = Minter.from_pretrained(config.out, encoder=library.encoder)
    base = replace(tiny, model=copy.deepcopy(tiny.model))  # the runtime wraps its model's linear layers
    runtime = Runtime(base, library=library, capacity=8, max_rank=8)
    settings = ServiceConfig(
        library=str(root / "lib"),
        generator=config.out,
        base_model="tiny-llama",
        api_keys=[KEY],
        auth="writes",  # reads open here; the default ("all") and the gate have tests of their own
        minted_store=str(root / "minted"),
        max_description_chars=500,
        max_examples=4,
        max_tokens=64,
        max_body_bytes=256 << 10,
        max_upload_bytes=256 << 10,
        max_unzipped_bytes=1 << 20,
        batch_wait_ms=20,
    )
    yield {"root": root, "library": library, "minter": minter, "runtime": runtime, "config": settings}
    library.close()


def make_app(world, minter=None, **changes):
    config = replace(world["config"], **changes)
    minter = minter or world["minter"]
    return create_app(config, runtime=world["runtime"], library=world["library"], minter=minter)


@pytest.fixture(scope="module")
def client(world):
    with TestClient(make_app(world)) as c:
        yield c


def error_type(response) -> str:
    return response.json()["error"]["type"]


def adapter_zip(adapter: LoraAdapter | None = None, files: dict[str, bytes] | None = None) -> bytes:
    """A zip of a PEFT folder (`adapter`), or of arbitrary `files` {name: bytes}."""
    if adapter is not None:
        files = {
            f"my_adapter/{CONFIG_FILE}": json.dumps(adapter.config.to_peft(adapter.modules)).encode(),
            f"my_adapter/{WEIGHTS_FILE}": save(adapter.state_dict()),
        }
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in (files or {}).items():
            archive.writestr(name, data)
    return buffer.getvalue()


def upload(client, data: bytes, description: str = "Translate English to French.", headers=AUTH, **form):
    return client.post(
        "/v1/experts",
        files={"file": ("adapter.zip", data, "application/zip")},
        data={"description": description, **form},
        headers=headers,
    )


def library_state(world) -> tuple[list[str], list[str]]:
    lib = world["library"]
    return sorted(e.id for e in lib.list()), sorted(p.name for p in lib.experts_dir.iterdir())


# ---- minting -----------------------------------------------------------------------------------------------
def test_mint_unstored_then_get_download_and_complete(client, world, tiny, tmp_path):
    response = client.post("/v1/adapters", json={"description": "Add the two numbers."}, headers=AUTH)
    assert response.status_code == 201, response.text
    info = response.json()
    assert info["id"].startswith("minted-") and info["stored"] is False and info["base_model"] == "tiny-llama"
    assert info["rank"] == 2 and info["num_modules"] == 4
    assert client.get(f"/v1/adapters/{info['id']}").json() == info
    assert client.get(f"/v1/experts/{info['id']}").status_code == 404  # not in the library
    assert info["id"] not in world["library"]

    # the download is a stock PEFT folder: PEFT's own loader gives the same logits as the adapter applied
    download = client.get(info["download_url"])
    assert download.status_code == 200 and download.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(download.content)) as archive:
        assert sorted(archive.namelist()) == [f"{info['id']}/{CONFIG_FILE}", f"{info['id']}/{WEIGHTS_FILE}"]
        archive.extractall(tmp_path)
    folder = tmp_path / info["id"]
    config = json.loads((folder / CONFIG_FILE).read_text())
    assert config["base_model_name_or_path"] == BASE and not config["modules_to_save"]
    from peft import PeftModel

    ids = tiny.tokenizer("hello there", return_tensors="pt").input_ids
    adapter = LoraAdapter.load(folder)
    with torch.no_grad():
        peft_logits = PeftModel.from_pretrained(copy.deepcopy(tiny.model), folder).eval()(ids).logits
        with apply_lora(tiny.model, adapter):
            ours = tiny.model(ids).logits
        plain = tiny.model(ids).logits
    assert torch.allclose(peft_logits, ours, atol=1e-5) and not torch.allclose(ours, plain, atol=1e-4)

    completion = client.post(
        "/v1/completions", json={"model": info["id"], "prompt": "1 + 2 =", "max_tokens": 4}
    )
    assert completion.status_code == 200, completion.text
    assert completion.json()["choices"][0]["route"] == {info["id"]: 1.0}


def test_mint_stored_is_retrievable_and_idempotent(client, world):
    description = "Write a limerick about a lazy dog."
    first = client.post("/v1/adapters", json={"description": description, "store": True}, headers=AUTH)
    assert first.status_code == 201, first.text
    info = first.json()
    assert info["stored"] is True and info["family"] == "minted" and info["id"] in world["library"]
    assert client.get(f"/v1/experts/{info['id']}").json()["description"] == description
    again = client.post("/v1/adapters", json={"description": description, "store": True}, headers=AUTH)
    assert again.status_code == 201 and again.json()["id"] == info["id"]  # same adapter, stored once
    hits = client.post("/v1/retrieve", json={"description": description, "k": 3}).json()["data"]
    assert hits[0]["id"] == info["id"] and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    named = {"description": description, "store": True, "id": info["id"]}
    assert client.post("/v1/adapters", json=named, headers=AUTH).status_code == 409


def test_mint_is_deterministic_and_takes_a_rank(client):
    def mint(**body):
        response = client.post(
            "/v1/adapters", json={"description": "Double the number.", **body}, headers=AUTH
        )
        assert response.status_code == 201, response.text
        return response.json()

    assert mint()["content_hash"] == mint()["content_hash"]
    assert mint(rank=1)["rank"] == 1
    too_high = client.post("/v1/adapters", json={"description": "Double it.", "rank": 5}, headers=AUTH)
    assert too_high.status_code == 422 and error_type(too_high) == "GeneratorError"


def test_concurrent_requests_are_batched_and_equal_to_alone(world):
    """Mint and completion requests arriving together run as one mint_many call / one runtime pass, each
    row with its own adapter, and give what each gives alone."""
    descriptions = ["Add one to the number.", "Tell a bedtime story about the moon.", "Multiply them."]
    models = ["strong", None, "arith_1"]  # one pass, three different routes
    with TestClient(make_app(world, batch_wait_ms=800)) as c:  # all six arrive within 0.8 s
        base = c.get("/v1/models").json()["data"][0]["id"]
        models[1] = base
        minted, completed = [None] * 3, [None] * 3

        def mint(i):
            minted[i] = c.post("/v1/adapters", json={"description": descriptions[i]}, headers=AUTH).json()

        def complete(i):
            body = {"model": models[i], "prompt": f"question {i}:", "max_tokens": 6}
            completed[i] = c.post("/v1/completions", json=body).json()["choices"][0]["text"]

        threads = [threading.Thread(target=f, args=(i,)) for f in (mint, complete) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        metrics = c.get("/metrics").text
        service = c.app.state.service
        for i in range(3):
            alone = world["minter"].mint(descriptions[i])
            batched = service.adapter(minted[i]["id"])
            assert all(torch.allclose(alone.delta(m), batched.delta(m), atol=1e-5) for m in alone.modules)
            body = {"model": models[i], "prompt": f"question {i}:", "max_tokens": 6}
            assert c.post("/v1/completions", json=body).json()["choices"][0]["text"] == completed[i]
    assert _sample(metrics, "loramint_batch_size_count", lane="mint") == 1
    assert _sample(metrics, "loramint_batch_size_sum", lane="mint") == 3
    assert _sample(metrics, "loramint_batch_size_count", lane="generate") == 1
    assert _sample(metrics, "loramint_batch_size_sum", lane="generate") == 3


def test_a_lane_with_two_workers_runs_two_batches_at_once_and_gathers_one_at_a_time():
    """While one batch runs, the next one gathers whatever arrives (one batch, not one per worker) and runs
    beside it on the other thread."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from loramint.service.lanes import Lane
    from loramint.service.metrics import Metrics

    both_running = threading.Barrier(2, timeout=5)
    batches: list[list[int]] = []

    def handler(items):
        batches.append(list(items))
        if items[0] in (0, 1):  # the first two batches each wait until the other one runs
            both_running.wait()
        return [i * 10 for i in items]

    async def main():
        lane = Lane(
            "t",
            handler,
            executor=ThreadPoolExecutor(2),
            metrics=Metrics.create(),
            max_batch=8,
            max_wait_s=0.2,
            workers=2,
        )
        lane.start()
        first = asyncio.ensure_future(lane.submit(0))
        await asyncio.sleep(0.3)  # batch [0] is running (and blocked until another batch runs)
        rest = await asyncio.gather(*(lane.submit(i) for i in (1, 2, 3)))
        out = [await first, *rest]
        await lane.stop()
        return out

    assert asyncio.run(main()) == [0, 10, 20, 30]
    assert batches == [[0], [1, 2, 3]]
    with pytest.raises(ValueError, match="at least one worker"):
        Lane("t", handler, executor=ThreadPoolExecutor(1), metrics=None, workers=0)


def _sample(metrics: str, name: str, **labels) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    match = re.search(rf"^{name}\{{{wanted}\}} (\S+)$", metrics, re.M)
    assert match, f"{name}{{{wanted}}} not in /metrics"
    return float(match.group(1))


# ---- completions -------------------------------------------------------------------------------------------
def sse_events(response) -> list:
    """The `data:` payloads of an SSE response, JSON-decoded except the final "[DONE]"."""
    events = [line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")]
    return [e if e == "[DONE]" else json.loads(e) for e in events]


@pytest.mark.parametrize("model", ["base", "arith_0", "auto"])
def test_completion_streams_the_same_text(client, model):
    model = BASE if model == "base" else model
    body = {"model": model, "prompt": "Add 2 and 3:", "max_tokens": 8}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    out = response.json()
    choice = out["choices"][0]
    assert out["object"] == "text_completion" and out["model"] == model and out["id"].startswith("cmpl-")
    assert choice["finish_reason"] in ("stop", "length") and choice["text"]
    usage = out["usage"]
    assert usage["prompt_tokens"] > 0 and 0 < usage["completion_tokens"] <= 8
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    expected_route = {BASE: {}, "arith_0": {"arith_0": 1.0}}.get(model)
    if expected_route is not None:
        assert choice["route"] == expected_route
    else:  # auto: the library's top_k (2) nearest experts to the prompt, weights summing to 1
        assert len(choice["route"]) == 2 and sum(choice["route"].values()) == pytest.approx(1.0)
        assert all(e.startswith("arith_") for e in choice["route"])

    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as streamed:
        assert streamed.status_code == 200 and streamed.headers["content-type"].startswith(
            "text/event-stream"
        )
        events = sse_events(streamed)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == choice["text"]
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == choice["finish_reason"]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_the_adapter_is_applied(client, tiny):
    body = {"prompt": "The answer is", "max_tokens": 12}
    texts = {
        model: client.post("/v1/completions", json={"model": model, **body}).json()["choices"][0]["text"]
        for model in (BASE, "strong")
    }
    reference = Runtime(replace(tiny, model=copy.deepcopy(tiny.model)), capacity=1, max_rank=4)
    reference.add("strong", STRONG)
    assert texts["strong"] != texts[BASE]
    assert texts["strong"].strip() == reference.generate([body["prompt"]], ["strong"], 12, chat=False)[0]


def test_chat_completion_and_stream(client):
    body = {
        "model": "write_1",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": [{"type": "text", "text": "Tell me a story."}]},
        ],
        "max_tokens": 8,
    }
    out = client.post("/v1/chat/completions", json=body).json()
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
    message = out["choices"][0]["message"]
    assert message["role"] == "assistant" and message["content"]
    body["stream"], body["stream_options"] = True, {"include_usage": True}
    with client.stream("POST", "/v1/chat/completions", json=body) as streamed:
        events = sse_events(streamed)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == message["content"]
    assert chunks[-2]["choices"][0]["finish_reason"] == out["choices"][0]["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == out["usage"]


def test_stop_sequences_cut_the_text(client):
    body = {"model": "strong", "prompt": "The answer is", "max_tokens": 16}
    full = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    assert len(full) >= 6, full
    stop = full[3:5]
    cut = client.post("/v1/completions", json={**body, "stop": [stop, "\u2603never"]}).json()["choices"][0]
    assert cut["text"] == full[: full.index(stop)] and cut["finish_reason"] == "stop"
    with client.stream("POST", "/v1/completions", json={**body, "stop": stop, "stream": True}) as streamed:
        pieces = [c["choices"][0]["text"] for c in sse_events(streamed)[:-1]]
    assert "".join(pieces) == cut["text"]


def test_stop_filter_holds_back_a_possible_stop_sequence():
    sent: list[str] = []
    f = _StopFilter(["END"], sent.append)
    for piece in ["ab", "cE", "N", "xyE", "ND", "more"]:
        f.feed(piece)
    # text that could still be the start of "END" (the last 2 characters) is held until it cannot
    assert f.close() == "abcENxy" and f.stopped and sent == ["ab", "c", "ENx", "y"]


def test_completion_errors(client):
    def post(path="/v1/completions", **body):
        return client.post(path, json={"model": BASE, "prompt": "hi", **body})

    assert post(model="no-such-adapter").status_code == 404
    assert error_type(post(model="no-such-adapter")) == "NotFoundError"
    assert post(model="../etc/passwd").status_code == 400
    assert post(max_tokens=65).status_code == 422  # configured limit 64
    assert post(n=2).status_code == 422
    long_prompt = " ".join(["word"] * 700)  # tiny-llama's context is 512 tokens
    too_long = post(prompt=long_prompt, max_tokens=8)
    assert too_long.status_code == 400 and error_type(too_long) == "ContextLengthError"
    streamed = post(model="missing", stream=True)
    assert streamed.status_code == 404  # errors before the first chunk are still HTTP errors
    assert client.post("/v1/chat/completions", json={"model": BASE, "messages": []}).status_code == 422


def test_models_list_vllm_shape(client):
    minted = client.post("/v1/adapters", json={"description": "Compose a haiku."}, headers=AUTH).json()
    cards = {c["id"]: c for c in client.get("/v1/models").json()["data"]}
    assert cards[BASE]["parent"] is None and cards[BASE]["root"] == BASE
    assert cards[BASE]["max_model_len"] == 512
    for model in ("auto", "arith_0", "write_6", minted["id"]):
        assert cards[model]["parent"] == BASE and cards[model]["root"] == model
        assert cards[model]["object"] == "model" and cards[model]["owned_by"] == "loramint"
    for model in (BASE, "auto", "arith_0", minted["id"]):  # OpenAI's models.retrieve once got a 404
        assert client.get(f"/v1/models/{model}").json() == cards[model]
    missing = client.get("/v1/models/no-such-adapter")
    assert missing.status_code == 404 and "no-such-adapter" in missing.json()["error"]["message"]


def test_healthz_and_metrics(client):
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["base_model"] == BASE and health["generator"] is True
    assert set(health["queues"]) == {"mint", "library", "generate", "files", "check"}
    client.get("/v1/adapters/arith_0")
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert (
        _sample(
            text, "loramint_requests_total", method="GET", route="/v1/adapters/{adapter_id}", status="200"
        )
        >= 1
    )
    assert "# TYPE loramint_request_seconds histogram" in text
    assert 'loramint_request_seconds_bucket{le="0.005",method="GET",route="/healthz"}' in text
    assert "loramint_completion_tokens_total" in text


def test_healthz_reports_the_runtimes_real_state(world):
    """A leaked runtime slot or a stopped worker makes /healthz answer 503 naming the problem (it used to say
    ok while every adapter completion failed)."""
    with TestClient(make_app(world)) as c:
        health = c.get("/healthz").json()
        assert health["runtime"]["slots_accounted"] and all(health["workers"].values())
        stack = c.app.state.service.runtime.stack
        leaked = stack._free.pop()  # what a slot leak leaves behind
        try:
            response = c.get("/healthz")
            assert response.status_code == 503 and response.json()["status"] == "degraded"
            assert "runtime slots leaked" in response.json()["problems"][0]
        finally:
            stack._free.append(leaked)
        assert c.get("/healthz").status_code == 200
        lane = c.app.state.service.lanes["mint"]
        assert lane.workers == 2
        lane._tasks[-1].cancel()  # one of its two workers dies: the lane is degraded, not half-healthy
        deadline = time.monotonic() + 5
        while lane.running and time.monotonic() < deadline:
            time.sleep(0.01)
        response = c.get("/healthz")
        assert response.status_code == 503 and "the mint worker is not running" in response.json()["problems"]


# ---- the expert library ------------------------------------------------------------------------------------
def test_upload_list_page_retrieve_serve_delete(client, world):
    adapter = LoraAdapter.random("tiny-llama", r=4, std=0.3, seed=11, target_modules=TARGETS)
    description = "Convert temperatures from Celsius to Fahrenheit."
    response = upload(client, adapter_zip(adapter), description, id="celsius", family="units")
    assert response.status_code == 201, response.text
    info = response.json()
    assert info["id"] == "celsius" and info["stored"] and info["rank"] == 4 and info["num_modules"] == 8
    assert info["content_hash"] == adapter.content_hash()  # stored exactly as uploaded
    assert upload(client, adapter_zip(adapter), description, id="celsius").status_code == 409

    everything = [e["id"] for e in client.get("/v1/experts", params={"limit": 1000}).json()["data"]]
    assert everything == [e.id for e in world["library"].list()] and "celsius" in everything
    page = client.get("/v1/experts", params={"offset": 2, "limit": 3}).json()
    assert [e["id"] for e in page["data"]] == everything[2:5]
    assert page["total"] == len(everything) and page["has_more"] is True
    last = client.get("/v1/experts", params={"offset": len(everything) - 1, "limit": 3}).json()
    assert [e["id"] for e in last["data"]] == everything[-1:] and last["has_more"] is False
    units = client.get("/v1/experts", params={"family": "units"}).json()
    assert [e["id"] for e in units["data"]] == ["celsius"] and units["total"] == 1
    hits = client.post(
        "/v1/retrieve", json={"description": "Celsius to Fahrenheit conversion", "k": 2}
    ).json()
    assert hits["data"][0]["id"] == "celsius"

    prompt = {"prompt": "The answer is", "max_tokens": 8}
    served = client.post("/v1/completions", json={"model": "celsius", **prompt}).json()["choices"][0]["text"]
    assert (
        served != client.post("/v1/completions", json={"model": BASE, **prompt}).json()["choices"][0]["text"]
    )

    # deleting drops it from the library and from the runtime; a new upload under the id is served fresh
    assert client.delete("/v1/experts/celsius").status_code == 401
    deleted = client.delete("/v1/experts/celsius", headers=AUTH)
    assert deleted.status_code == 200 and deleted.json() == {
        "id": "celsius",
        "object": "expert",
        "deleted": True,
    }
    assert "celsius" not in world["library"] and client.get("/v1/adapters/celsius").status_code == 404
    assert client.post("/v1/completions", json={"model": "celsius", **prompt}).status_code == 404
    assert client.delete("/v1/experts/celsius", headers=AUTH).status_code == 404
    other = LoraAdapter.random("tiny-llama", r=4, std=0.3, seed=12, target_modules=TARGETS)
    assert upload(client, adapter_zip(other), description, id="celsius").status_code == 201
    again = client.post("/v1/completions", json={"model": "celsius", **prompt}).json()["choices"][0]["text"]
    reference = Runtime(replace(world["runtime"].base, model=_fresh_tiny()), capacity=1, max_rank=4)
    reference.add("other", other)
    assert again.strip() == reference.generate([prompt["prompt"]], ["other"], 8, chat=False)[0]
    client.delete("/v1/experts/celsius", headers=AUTH)


def _fresh_tiny():
    from loramint.models import load_base_model

    return load_base_model("tiny-llama").model


def _nan_adapter() -> LoraAdapter:
    adapter = LoraAdapter.random("tiny-llama", r=2, seed=5)
    a, b = next(iter(adapter.weights.values()))
    a[0, 0] = float("nan")
    return adapter


def _symlink_zip() -> bytes:
    good = zipfile.ZipFile(io.BytesIO(adapter_zip(LoraAdapter.random("tiny-llama", r=2, seed=6))))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for info in good.infolist():
            archive.writestr(info, good.read(info))
        link = zipfile.ZipInfo("my_adapter/README.md")
        link.external_attr = 0o120777 << 16  # a symlink entry, target /etc/passwd
        archive.writestr(link, "/etc/passwd")
    return buffer.getvalue()


def _good_files(prefix: str = "") -> dict[str, bytes]:
    adapter = LoraAdapter.random("tiny-llama", r=2, seed=8)
    return {
        f"{prefix}{CONFIG_FILE}": json.dumps(adapter.config.to_peft(adapter.modules)).encode(),
        f"{prefix}{WEIGHTS_FILE}": save(adapter.state_dict()),
    }


MALICIOUS = {
    "traversal": {**_good_files(), "../../evil.txt": b"x"},
    "traversal-into-folder": _good_files("../"),
    "absolute": {f"/tmp/{CONFIG_FILE}": b"{}", WEIGHTS_FILE: b""},
    "pickle": {**_good_files(), "adapter_model.bin": b"\x80\x04K\x01."},
    "nested": _good_files("a/b/"),
    "zip-bomb": {**_good_files(), "README.md": b"\0" * (4 << 20)},
    "no-weights": {CONFIG_FILE: b"{}"},
    "another-base-model": {
        CONFIG_FILE: json.dumps({"base_model_name_or_path": "tiny-llama", "r": 2, "lora_alpha": 4}).encode(),
        WEIGHTS_FILE: save(
            {
                "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 576),
                "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(576, 2),
            }
        ),
    },
    "modules-to-save": {
        **_good_files(),
        WEIGHTS_FILE: save(
            {
                **LoraAdapter.random("tiny-llama", r=2, seed=9).state_dict(),
                "base_model.model.lm_head.modules_to_save.default.weight": torch.zeros(4, 4),
            }
        ),
    },
}


REASONS = {
    "traversal": "'..' in its path",
    "traversal-into-folder": "'..' in its path",
    "absolute": "absolute",
    "pickle": "never loads pickles",
    "nested": "top level or in one folder",
    "zip-bomb": "decompresses to more than",
    "no-weights": "no adapter_model.safetensors",
    "another-base-model": "trained for another base model",
    "modules-to-save": "no modules_to_save",
    "not-a-zip": "not a readable zip",
    "nan": "NaN",
    "symlink": "links and special files",
    "rank-above-max": "exceeds the service's max_rank",
}


@pytest.mark.parametrize("payload", list(REASONS))
def test_bad_uploads_are_refused_and_nothing_is_stored(client, world, payload):
    before = library_state(world)
    if payload == "not-a-zip":
        data = b"PK\x03\x04 certainly not a zip"
    elif payload == "nan":
        data = adapter_zip(_nan_adapter())
    elif payload == "symlink":
        data = _symlink_zip()
    elif payload == "rank-above-max":  # valid PEFT, but above the runtime's max_rank (8)
        data = adapter_zip(LoraAdapter.random("tiny-llama", r=12, seed=10))
    else:
        data = adapter_zip(files=MALICIOUS[payload])
    response = upload(client, data, id=f"bad-{payload}")
    assert response.status_code == 422, response.text
    assert error_type(response) == "AdapterError"
    assert REASONS[payload] in response.json()["error"]["message"]
    assert library_state(world) == before
    assert not (world["root"] / "evil.txt").exists() and not Path("/tmp/adapter_config.json").exists()


def test_upload_limits_and_auth(client, world):
    before = library_state(world)
    good = adapter_zip(LoraAdapter.random("tiny-llama", r=2, seed=13))
    assert upload(client, good, headers={}).status_code == 401
    wrong = upload(client, good, headers={"Authorization": "Bearer not-the-key"})
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
    oversize = adapter_zip(files={**_good_files(), "README.md": os.urandom(300 << 10)})  # incompressible
    assert upload(client, oversize).status_code == 413
    assert upload(client, good, description="x" * 501).status_code == 422
    assert upload(client, good, id="../escape").status_code == 400
    assert library_state(world) == before


# ---- security and limits ---------------------------------------------------------------------------------
def test_mutating_endpoints_need_a_key_reads_do_not(client):
    mint = {"description": "Add numbers."}
    assert client.post("/v1/adapters", json=mint).status_code == 401
    assert error_type(client.post("/v1/adapters", json=mint)) == "AuthError"
    assert (
        client.post("/v1/adapters", json=mint, headers={"Authorization": "Bearer wrong-key-123"}).status_code
        == 401
    )
    assert client.delete("/v1/experts/arith_0").status_code == 401
    assert "arith_0" in client.app.state.service.library
    for path in ("/v1/models", "/v1/experts", "/v1/adapters/arith_0", "/healthz", "/metrics"):
        assert client.get(path).status_code == 200, path
    assert client.post("/v1/retrieve", json={"description": "sums"}).status_code == 200
    # a key that is sent is checked on reads too: a wrong one was once silently accepted
    wrong = {"Authorization": "Bearer wrong-key-123"}
    assert client.get("/v1/experts", headers=wrong).status_code == 401
    assert client.post("/v1/retrieve", json={"description": "sums"}, headers=wrong).status_code == 401
    assert client.get("/v1/experts", headers=AUTH).status_code == 200


def test_auth_all_guards_reads_too(world):
    with TestClient(make_app(world, auth="all")) as c:
        assert c.get("/v1/models").status_code == 401
        assert c.post("/v1/completions", json={"model": BASE, "prompt": "x"}).status_code == 401
        assert c.get("/v1/models", headers=AUTH).status_code == 200
        assert c.get("/healthz").status_code == 200  # liveness stays open
    with pytest.raises(ValueError, match="LORAMINT_API_KEYS"):
        make_app(world, api_keys=[])


def test_by_default_every_v1_endpoint_needs_the_key():
    """With auth on, reads need the key too (what users of an authenticated API expect); liveness, the page
    and the API docs stay open."""
    assert ServiceConfig().auth == "all"
    from loramint.service.guard import key_problem

    config = ServiceConfig(api_keys=[KEY])
    for method, path in (
        ("GET", "/v1/models"),
        ("POST", "/v1/retrieve"),
        ("POST", "/v1/chat/completions"),
        ("GET", "/v1/adapters/x/download"),
        ("POST", "/v1/adapters"),
        ("DELETE", "/v1/experts/x"),
    ):
        assert key_problem(config, method, path, None), (method, path)
        assert key_problem(config, method, path, KEY) is None
        assert key_problem(config, method, path, "wrong-key-123") == "the API key is not valid"
    for path in ("/healthz", "/", "/openapi.json", "/docs"):
        assert key_problem(config, "GET", path, None) is None
    assert key_problem(config, "GET", "/metrics", None)  # Prometheus scrapes with a bearer token


def test_the_key_is_checked_before_the_body_is_read(client):
    """A request without a valid key is refused from its headers: its body is never read or parsed."""
    import asyncio

    from loramint.service.guard import Guard

    assert (
        client.post(
            "/v1/adapters", content=b"{not json", headers={"Content-Type": "application/json"}
        ).status_code
        == 401
    )
    wrong = {"Authorization": "Bearer wrong-key-123", "Content-Type": "application/json"}
    assert client.post("/v1/adapters", content=b"{not json", headers=wrong).status_code == 401

    async def app(scope, receive, send):  # the app behind the gate: reached only past it
        raise AssertionError("the gate let an unauthenticated request through")

    async def receive():
        raise AssertionError("the gate read the body")

    sent = []

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/experts",
        "headers": [(b"content-length", b"999999")],
    }
    asyncio.run(Guard(app, ServiceConfig(api_keys=[KEY]))(scope, receive, send))
    assert sent[0]["status"] == 401 and (b"www-authenticate", b"Bearer") in sent[0]["headers"]


def test_mint_and_upload_rate_limits_per_key(world):
    """Each key has its own allowance; one request over it gets 429 with Retry-After; tokens come back."""
    from loramint.service.guard import RateLimits

    other = "another-key-0123456789"
    with TestClient(make_app(world, mint_per_minute=2, upload_per_minute=1, api_keys=[KEY, other])) as c:
        body = {"description": "Add the two numbers.", "store": False}
        assert [c.post("/v1/adapters", json=body, headers=AUTH).status_code for _ in range(2)] == [201, 201]
        refused = c.post("/v1/adapters", json=body, headers=AUTH)
        assert refused.status_code == 429 and error_type(refused) == "RateLimitError"
        assert (
            int(refused.headers["Retry-After"]) >= 1
            and "2 mint requests a minute" in refused.json()["error"]["message"]
        )
        assert (
            c.post("/v1/adapters", json=body, headers={"Authorization": f"Bearer {other}"}).status_code == 201
        )
        assert c.get("/v1/models").status_code == 200  # reads spend no allowance
        assert upload(c, b"not a zip").status_code == 422  # the one upload of the minute (refused as invalid)
        assert upload(c, b"not a zip").status_code == 429
    now = [0.0]
    limits = RateLimits({"mint": 60}, clock=lambda: now[0])
    assert all(limits.take("mint", "k") == 0 for _ in range(60)) and limits.take("mint", "k") > 0
    now[0] += 1.0  # 60 a minute: one token a second
    assert limits.take("mint", "k") == 0 and limits.take("mint", "k") == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"description": "x" * 501}, 422),  # configured max_description_chars
        ({"description": "x" * 9000}, 422),  # the schema's hard cap
        ({"description": ""}, 422),
        ({"description": "ok", "examples": ["a"] * 5}, 422),  # configured max_examples 4
        ({"description": "ok", "rank": 0}, 422),
        ({"description": "ok", "rank": True}, 422),  # not coerced to 1
        ({"description": "ok", "store": 1}, 422),  # not coerced to true
        ({"description": "ok", "seed": 1}, 422),  # no sampling: the prior's variance is never trained
        ({"description": "ok", "unknown": 1}, 422),
        ({"description": "ok", "id": "../../etc"}, 400),
        ({"description": "ok", "id": "a..b"}, 400),
        ({"description": "y" * (300 << 10)}, 413),  # over max_body_bytes (256 KiB)
    ],
)
def test_mint_limits(client, body, status):
    before = len(client.app.state.service.minted)
    response = client.post("/v1/adapters", json=body, headers=AUTH)
    assert response.status_code == status, response.text
    assert "error" in response.json()
    assert len(client.app.state.service.minted) == before


@pytest.mark.parametrize("bad", ["bad!id", "..hidden", "a..b", ".dot", "x" * 129, "a b"])
def test_invalid_ids_are_400(client, bad):
    for response in (
        client.get(f"/v1/adapters/{bad}"),
        client.get(f"/v1/adapters/{bad}/download"),
        client.get(f"/v1/experts/{bad}"),
        client.delete(f"/v1/experts/{bad}", headers=AUTH),
        client.post("/v1/completions", json={"model": bad, "prompt": "x"}),
    ):
        assert response.status_code == 400, (bad, response.request.url, response.text)
        assert error_type(response) == "InvalidIdError"


def test_a_full_queue_answers_429_and_a_late_job_504(world):
    """One mint blocks the only worker, one waits in the queue (size 1): a third is refused at once; the
    waiting ones time out; afterwards the service works again."""
    started, release = threading.Event(), threading.Event()

    class Blocking:
        layout = world["minter"].layout

        def mint_many(self, *args, **kwargs):
            started.set()
            release.wait(10)
            return world["minter"].mint_many(*args, **kwargs)

        def mint(self, *args, **kwargs):
            return world["minter"].mint(*args, **kwargs)

        def provenance(self, *args, **kwargs):
            return world["minter"].provenance(*args, **kwargs)

    app = make_app(
        world, minter=Blocking(), queue_size=1, mint_batch=1, mint_workers=1, batch_wait_ms=0, timeout_s=1.5
    )
    with TestClient(app) as c:
        answers: dict[str, int] = {}

        def mint(name):
            answers[name] = c.post("/v1/adapters", json={"description": name}, headers=AUTH).status_code

        first = threading.Thread(target=mint, args=("first",))
        first.start()
        assert started.wait(10)
        second = threading.Thread(target=mint, args=("second",))
        second.start()
        deadline = time.monotonic() + 5
        while c.get("/healthz").json()["queues"]["mint"] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        full = c.post("/v1/adapters", json={"description": "third"}, headers=AUTH)
        assert full.status_code == 429 and error_type(full) == "QueueFullError"
        assert full.headers["retry-after"] == "1"
        first.join()
        second.join()
        assert answers == {"first": 504, "second": 504}
        release.set()
        while c.get("/healthz").json()["queues"]["mint"] > 0:  # the timed-out job leaves the queue
            time.sleep(0.01)
        ok = c.post("/v1/adapters", json={"description": "fourth"}, headers=AUTH)
        assert ok.status_code == 201, ok.text
        metrics = c.get("/metrics").text
    assert _sample(metrics, "loramint_queue_rejected_total", lane="mint") == 1
    assert _sample(metrics, "loramint_queue_timeouts_total", lane="mint") == 2


def test_openapi_snapshot(client):
    """The API's shape is committed: a change shows in the diff (LORAMINT_UPDATE_SNAPSHOTS=1 rewrites it)."""
    schema = json.dumps(client.app.openapi(), indent=1, sort_keys=True) + "\n"
    if os.environ.get("LORAMINT_UPDATE_SNAPSHOTS") or not SNAPSHOT.exists():
        SNAPSHOT.write_text(schema)
    assert schema == SNAPSHOT.read_text()
    paths = json.loads(schema)["paths"]
    for path in ("/v1/adapters", "/v1/retrieve", "/v1/experts", "/v1/completions", "/v1/chat/completions"):
        assert path in paths


# ---- a real server -----------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _printed_commands(text: str) -> list[str]:
    """The shell commands in `loramint serve`'s ready message (continuation lines joined, comments cut)."""
    lines = text.split("loramint is ready on", 1)[1].splitlines()[1:]
    commands, current = [], ""
    for line in lines:
        if not line.startswith("  "):
            break
        current += line.strip().split("   # ")[0].rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            if current.startswith("curl"):
                commands.append(current.strip())
            current = ""
    return commands


def test_uvicorn_process_with_the_openai_client(world, tmp_path):
    """`loramint serve` in its own process on loopback, driven by the official openai client."""
    import httpx
    import openai

    port = _free_port()
    env = {**os.environ, "LORAMINT_API_KEYS": KEY, "LORAMINT_PORT": str(port), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "loramint.cli",
        "serve",
        "--service.base_model=tiny-llama",
        f"--service.library={world['config'].library}",
        f"--service.generator={world['config'].generator}",
        "--service.port=1",  # LORAMINT_PORT overrides it
        "--log_level=warning",
    ]
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not start in 120 s"
            time.sleep(0.25)

        # the ready message's curl commands work as printed (the key is never printed, only <key>)
        printed = (tmp_path / "server.log").read_text()
        assert f"loramint is ready on {url}" in printed and KEY not in printed
        commands = [
            c.replace("<key>", KEY) for c in _printed_commands(printed)
        ]  # mint, then chat with the minted id
        assert len(commands) == 2 and shutil.which("curl"), printed
        minted = json.loads(subprocess.run(["sh", "-c", commands[0]], capture_output=True, check=True).stdout)
        assert f'# -> {{"id": "{minted["id"]}"' in printed  # the real id, printed as it is
        assert minted["id"] in commands[1]
        chat_command = commands[1]
        answer = json.loads(
            subprocess.run(["sh", "-c", chat_command], capture_output=True, check=True).stdout
        )
        assert answer["model"] == minted["id"] and answer["choices"][0]["message"]["role"] == "assistant"

        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
        models = {m.id: m for m in client.models.list()}
        assert BASE in models and "arith_0" in models and models["arith_0"].parent == BASE

        completion = client.completions.create(model="arith_0", prompt="2 + 2 =", max_tokens=5)
        assert completion.choices[0].finish_reason in ("stop", "length")
        assert completion.usage.completion_tokens <= 5

        messages = [{"role": "user", "content": "Write a poem about the sea."}]
        chat = client.chat.completions.create(model="auto", messages=messages, max_tokens=6)
        assert chat.choices[0].message.role == "assistant"
        pieces = [
            chunk.choices[0].delta.content or ""
            for chunk in client.chat.completions.create(
                model="auto", messages=messages, max_tokens=6, stream=True
            )
            if chunk.choices
        ]
        assert "".join(pieces) == chat.choices[0].message.content

        with pytest.raises(openai.NotFoundError, match="does not exist"):
            client.completions.create(model="no-such-adapter", prompt="x", max_tokens=2)
        minted = httpx.post(f"{url}/v1/adapters", json={"description": "Add the numbers."}, headers=AUTH)
        assert minted.status_code == 201
        text = client.completions.create(model=minted.json()["id"], prompt="1 + 1 =", max_tokens=3)
        assert text.model == minted.json()["id"]
        assert httpx.post(f"{url}/v1/adapters", json={"description": "x"}).status_code == 401
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def test_a_chunked_body_over_the_limit_is_413(client):
    def chunks():
        yield b'{"description": "'
        for _ in range(40):
            yield b"z" * (8 << 10)
        yield b'"}'

    response = client.post("/v1/retrieve", content=chunks(), headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and error_type(response) == "PayloadTooLargeError"


def test_a_row_that_cannot_load_fails_alone(client):
    service = client.app.state.service
    jobs = [
        CompletionJob(prompt="hello", route=None, max_tokens=3),
        CompletionJob(prompt="hello", route={"ghost": 1.0}, max_tokens=3),
        CompletionJob(prompt="hello", route="strong", max_tokens=3),
    ]
    results = service.complete_batch(jobs)
    assert isinstance(results[1], NotFoundError)
    assert isinstance(results[0], CompletionResult) and isinstance(results[2], CompletionResult)
    assert results[2].route == {"strong": 1.0} and results[0].route == {}


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"LORAMINT_API_KEYS": "key-one-123, key-two-456"}, {"api_keys": ["key-one-123", "key-two-456"]}),
        ({"LORAMINT_PORT": "9001", "LORAMINT_TIMEOUT_S": "2.5"}, {"port": 9001, "timeout_s": 2.5}),
        ({"LORAMINT_GENERATOR": "", "LORAMINT_AUTH": "none"}, {"generator": None, "auth": "none"}),
        ({"LORAMINT_DEVICE": "cpu", "LORAMINT_CACHE": "/elsewhere"}, {"device": "cpu"}),
        ({"LORAMINT_TORCH_THREADS": "3"}, {"torch_threads": 3}),
        ({"LORAMINT_TORCH_THREADS": ""}, {"torch_threads": None}),
    ],
)
def test_config_from_env(env, expected):
    config = ServiceConfig(port=8000).with_env(env)
    assert {k: getattr(config, k) for k in expected} == expected


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"auth": "some"}, "auth must be"),
        ({"port": 70000}, "port must be"),
        ({"api_keys": ["short"]}, "at least 8"),
        ({"queue_size": 0}, "queue_size must be >= 1"),
        ({"top_k": 100}, "cannot exceed capacity"),
        ({"torch_threads": 0}, "torch_threads must be"),
    ],
)
def test_config_is_validated(changes, message):
    with pytest.raises(ValueError, match=message):
        ServiceConfig(**changes)
    with pytest.raises(ValueError, match="LORAMINT_PORT"):
        ServiceConfig().with_env({"LORAMINT_PORT": "eighty"})


def test_torch_threads_share_the_cores_between_mint_workers(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert ServiceConfig(mint_workers=2).thread_count() == 4
    assert ServiceConfig(mint_workers=16).thread_count() == 1
    assert ServiceConfig(mint_workers=2, torch_threads=3).thread_count() == 3


def test_mint_under_a_chosen_id_never_replaces_anything(client, world):
    before = world["library"].get("arith_0").content_hash
    taken = client.post(
        "/v1/adapters", json={"description": "Sum it.", "id": "arith_0", "store": True}, headers=AUTH
    )
    assert taken.status_code == 409 and error_type(taken) == "AlreadyExistsError"
    assert world["library"].get("arith_0").content_hash == before
    mine = client.post("/v1/adapters", json={"description": "Sum it.", "id": "my-summer"}, headers=AUTH)
    assert mine.status_code == 201 and mine.json()["id"] == "my-summer" and not mine.json()["stored"]
    again = client.post("/v1/adapters", json={"description": "Other.", "id": "my-summer"}, headers=AUTH)
    assert again.status_code == 409
    assert client.get("/v1/adapters/my-summer").json()["description"] == "Sum it."
    body = {"model": "my-summer", "prompt": "1 + 1 =", "max_tokens": 3}
    assert client.post("/v1/completions", json=body).status_code == 200


def test_without_a_generator_minting_is_503(world):
    config = replace(world["config"], generator=None)
    with TestClient(create_app(config, runtime=world["runtime"], library=world["library"])) as c:
        response = c.post("/v1/adapters", json={"description": "Add."}, headers=AUTH)
        assert response.status_code == 503 and error_type(response) == "UnavailableError"
        assert c.get("/healthz").json()["generator"] is False
        assert c.post("/v1/retrieve", json={"description": "Add."}).status_code == 200


def test_a_list_of_prompts_is_one_batch_equal_to_each_alone(client):
    prompts = ["The answer is", "Once upon a time there was", "x"]
    body = {"model": "strong", "max_tokens": 6}
    both = client.post("/v1/completions", json={**body, "prompt": prompts}).json()
    assert [c["index"] for c in both["choices"]] == [0, 1, 2]
    alone = [client.post("/v1/completions", json={**body, "prompt": p}).json()["choices"][0] for p in prompts]
    assert [c["text"] for c in both["choices"]] == [c["text"] for c in alone]
    assert both["usage"]["completion_tokens"] == sum(
        client.post("/v1/completions", json={**body, "prompt": p}).json()["usage"]["completion_tokens"]
        for p in prompts
    )
    with client.stream(
        "POST", "/v1/completions", json={**body, "prompt": prompts, "stream": True}
    ) as streamed:
        chunks = sse_events(streamed)[:-1]
    for i, choice in enumerate(alone):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == i]
        assert "".join(c["text"] for c in mine) == choice["text"]
        assert mine[-1]["finish_reason"] == choice["finish_reason"]


def test_encoded_traversal_in_the_url_matches_no_route(client):
    for path in ("/v1/adapters/..%2F..%2Fetc%2Fpasswd/download", "/v1/experts/%2E%2E%2Flibrary.sqlite"):
        response = client.get(path)
        assert response.status_code in (400, 404), (path, response.status_code)
        assert response.headers["content-type"] == "application/json"


def test_a_missing_generator_stops_startup_with_a_clear_error(world, tmp_path):
    config = replace(world["config"], generator=str(tmp_path / "nowhere"))
    with (
        pytest.raises(GeneratorError, match="not a generator checkpoint"),
        TestClient(create_app(config, runtime=world["runtime"])),
    ):
        pass


def test_a_stream_that_cannot_start_in_time_is_504(world):
    """A busy runtime: a streaming request gets a plain HTTP 504 (no half-open event stream)."""
    started, release = threading.Event(), threading.Event()
    with TestClient(make_app(world, timeout_s=1.0, batch_wait_ms=0)) as c:
        lane = c.app.state.service.lanes["generate"]
        real = lane.handler

        def blocking(jobs):
            started.set()
            release.wait(10)
            return real(jobs)

        lane.handler = blocking
        body = {"model": BASE, "prompt": "hi", "max_tokens": 2}
        answers = []
        busy = threading.Thread(
            target=lambda: answers.append(c.post("/v1/completions", json=body).status_code)
        )
        busy.start()
        assert started.wait(10)
        streamed = c.post("/v1/completions", json={**body, "stream": True})
        assert streamed.status_code == 504 and error_type(streamed) == "WorkTimeoutError"
        busy.join()
        assert answers == [504]
        release.set()
        lane.handler = real
        ok = c.post("/v1/completions", json={**body, "stream": True})
        assert ok.status_code == 200 and ok.text.rstrip().endswith("data: [DONE]")


# ---- found by fuzzing the OpenAPI schema (tests/test_schema_fuzz.py) ---------------------------------------
@pytest.mark.parametrize("query", ["offset=9223372036854775808", "offset=-1", "limit=0", "limit=1001"])
def test_expert_paging_out_of_range_is_422(client, query):
    """An offset past SQLite's integers was an OverflowError in the library's query: HTTP 500."""
    response = client.get(f"/v1/experts?{query}")
    assert response.status_code == 422 and error_type(response) == "RequestValidationError"
    assert client.get("/v1/experts?offset=9223372036854775807").json()["data"] == []


def test_error_answers_are_documented_with_their_body(client):
    """Every error status a route can answer is in its OpenAPI entry, with the `{"error": ...}` body."""
    paths = client.app.openapi()["paths"]
    ref = {"$ref": "#/components/schemas/ErrorResponse"}
    for method, path, codes in [
        ("post", "/v1/adapters", {"400", "401", "409", "413", "422", "429", "503", "504"}),
        ("get", "/v1/adapters/{adapter_id}", {"400", "401", "404", "422"}),
        ("post", "/v1/retrieve", {"400", "401", "413", "422", "429", "504"}),
        ("post", "/v1/chat/completions", {"400", "401", "404", "413", "422", "429", "504"}),
        ("delete", "/v1/experts/{expert_id}", {"400", "401", "404", "422", "429", "504"}),
    ]:
        responses = paths[path][method]["responses"]
        assert codes <= set(responses), (path, codes - set(responses))
        assert all(responses[c]["content"]["application/json"]["schema"] == ref for c in codes)
    response = client.post("/v1/retrieve", content=b"\xff\xfe", headers={"Content-Type": "application/json"})
    assert response.status_code in (400, 422) and set(response.json()["error"]) >= {"message", "type", "code"}


@pytest.mark.parametrize(
    "body",
    [
        {"messages": [{"role": "user", "content": "a\ud800"}]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]},
        {"messages": [{"role": "user", "content": "hi"}], "stop": "\ud800"},
        {"messages": [{"role": "user", "content": "hi"}], "stop": ""},  # would cut every answer to ""
    ],
)
@pytest.mark.parametrize("model", [BASE, "auto"])
def test_text_a_tokenizer_cannot_take_is_422(client, body, model):
    """A lone surrogate in a chat message reached the tokenizer (TypeError, HTTP 500)."""
    data = json.dumps({"model": model, "max_tokens": 2, **body})  # ensure_ascii: "\ud800" as JSON escapes
    response = client.post("/v1/chat/completions", content=data, headers={"Content-Type": "application/json"})
    assert response.status_code == 422 and error_type(response) == "RequestValidationError"


def test_errors_never_show_the_servers_file_system(client, world):
    """Messages once carried absolute paths (`no expert 'x' in library /srv/.../lib`)."""
    for path in ("/v1/experts/no-such-expert", "/v1/adapters/no-such-adapter"):
        response = client.get(path)
        message = response.json()["error"]["message"]
        assert response.status_code == 404 and "no-such" in message, message
        assert str(world["root"]) not in message and not re.search(r"(^|\s)/\w", message), message
    from loramint.service.errors import public_message

    # the API's own URL paths survive (a message that says where to go must keep it); files do not
    text = "use DELETE /v1/experts/x-1 for it; library /srv/data/lib-a/experts/x-1 failed"
    assert public_message(text) == "use DELETE /v1/experts/x-1 for it; library x-1 failed"


def test_limits_are_one_source_of_truth(client, world):
    """The OpenAPI document once allowed 8,000-character descriptions while the server refused above 4,000."""
    from loramint.service.config import LIMITS
    from loramint.service.schemas import Limits

    config = world["config"]
    assert set(Limits.model_fields) == set(LIMITS)
    assert client.get("/v1/limits").json() == config.limits()
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    for model in ("MintRequest", "RetrieveRequest", "Body_upload_v1_experts_post"):
        assert schemas[model]["properties"]["description"]["maxLength"] == config.max_description_chars == 500
    examples = schemas["MintRequest"]["properties"]["examples"]["anyOf"][0]
    assert (
        examples["maxItems"] == config.max_examples
        and examples["items"]["anyOf"][0]["maxLength"] == config.max_example_chars  # the text branch
    )
    assert (
        schemas["CompletionRequest"]["properties"]["max_tokens"]["anyOf"][0]["maximum"] == config.max_tokens
    )
    over = client.post("/v1/adapters", json={"description": "x" * 501}, headers=AUTH)
    assert over.status_code in (400, 422) and "500" in over.json()["error"]["message"]


def test_a_mint_says_which_experts_it_draws_on_and_how_well_they_fit(client, world):
    """Out-of-library requests got adapters with no sign that nothing in the library fits."""
    near = client.post("/v1/adapters", json={"description": "Add the two numbers together."}, headers=AUTH)
    far = client.post("/v1/adapters", json={"description": "Answer like a pirate would."}, headers=AUTH)
    reports = [r.json()["metrics"]["minted"] for r in (near, far)]
    bank = world["minter"].bank.names
    for report in reports:
        sims = [e["similarity"] for e in report["experts"]]
        assert report["experts"] and all(e["id"] in bank for e in report["experts"])
        assert sims == sorted(sims, reverse=True) and report["confidence"] == sims[0]
    assert reports[0]["confidence"] > reports[1]["confidence"]  # an arithmetic library fits the sum better
    assert reports[0]["experts"][0]["id"].startswith("arith")


def test_an_abandoned_stream_stops_decoding(world, monkeypatch):
    """A streaming client that goes away cancels its decoding: the runtime pass stops after its current
    step, so the lane is free for the next request (it used to decode to max_tokens for nobody)."""
    import httpx
    from test_web import serving

    runtime = world["runtime"]
    real_stream = runtime.stream
    steps = []

    def slow_stream(*args, **kwargs):  # 50 ms a token: 64 tokens would take 3.2 s
        for item in real_stream(*args, **kwargs):
            steps.append(item)
            time.sleep(0.05)
            yield item

    monkeypatch.setattr(runtime, "stream", slow_stream)
    app = make_app(world)
    with serving(app) as url:
        body = {"model": "strong", "prompt": "Once upon a time", "max_tokens": 64, "stream": True}
        with (
            httpx.Client(timeout=30) as http,
            http.stream("POST", f"{url}/v1/completions", json=body) as response,
        ):
            assert response.status_code == 200
            next(response.iter_lines())  # the first chunk arrived: decoding is under way
        # the client is gone; the pass stops within a few steps instead of running to 64 tokens
        deadline = time.monotonic() + 10
        while not re.search(
            r"^loramint_cancelled_completions_total [1-9]", httpx.get(f"{url}/metrics").text, re.M
        ):
            assert time.monotonic() < deadline, "the abandoned stream was not cancelled"
            time.sleep(0.1)
        assert len(steps) < 40
        answer = httpx.post(
            f"{url}/v1/completions", json={**body, "stream": False, "max_tokens": 4}, timeout=30
        )
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] <= 4


# ---- kept minted adapters ------------------------------------------------------------------------------------
def test_a_minted_adapter_outlives_a_restart_unless_store_is_false(world):
    """By default a mint is kept on disk with an expiry, so the id a user was given still works after a
    restart; `store: false` is ephemeral on purpose; DELETE /v1/adapters/{id} forgets a minted adapter."""
    body = {"description": "Multiply the two numbers and give the product."}
    with TestClient(make_app(world)) as c:
        kept = c.post("/v1/adapters", json=body, headers=AUTH).json()
        assert kept["kept"] and not kept["stored"] and kept["expires_at"] > time.time() + 3600
        ephemeral = c.post(
            "/v1/adapters", json={**body, "store": False, "id": "just-now"}, headers=AUTH
        ).json()
        assert not ephemeral["kept"] and ephemeral["expires_at"] is None
        assert kept["id"] not in world["library"]  # kept mints are never retrieved as library experts
    with TestClient(make_app(world)) as c:  # a restart
        again = c.get(f"/v1/adapters/{kept['id']}")
        assert again.status_code == 200 and again.json()["content_hash"] == kept["content_hash"]
        assert c.get(f"/v1/adapters/{kept['id']}/download").status_code == 200
        chat = {"model": kept["id"], "messages": [{"role": "user", "content": "2 x 3"}], "max_tokens": 3}
        assert c.post("/v1/chat/completions", json=chat).status_code == 200
        assert c.get("/v1/adapters/just-now").status_code == 404
        assert kept["id"] in {m["id"] for m in c.get("/v1/models").json()["data"]}
        assert c.delete(f"/v1/adapters/{kept['id']}").status_code == 401
        assert c.delete(f"/v1/adapters/{kept['id']}", headers=AUTH).status_code == 204
        assert c.get(f"/v1/adapters/{kept['id']}").status_code == 404
        assert c.delete("/v1/adapters/arith_0", headers=AUTH).status_code == 409  # a library expert
        assert "arith_0" in world["library"]


def test_kept_mints_expire_and_stay_under_each_keys_quota(world, tmp_path):
    from loramint.service.core import MintedStore
    from loramint.service.errors import QuotaError

    adapters = [LoraAdapter.random("tiny-llama", r=2, seed=s) for s in range(3)]
    size = adapters[0].nbytes()
    now, dropped = [1000.0], []

    def open_store() -> MintedStore:
        return MintedStore(
            tmp_path / "kept",
            world["library"].encoder,
            ttl_s=60,
            quota_bytes=2 * size,
            on_drop=dropped.append,
            clock=lambda: now[0],
        )

    store = open_store()
    vec = world["library"].encoder.encode("Add the numbers.")
    fields = {"name": "m", "description": "Add the numbers.", "family": "minted"}
    store.add(adapters[0], "m0", "alice", vec, **fields)
    now[0] += 30
    store.add(adapters[1], "m1", "alice", vec, **fields)
    with pytest.raises(QuotaError, match="quota") as refused:
        store.add(adapters[2], "m2", "alice", vec, **fields)
    assert refused.value.retry_after == 31  # m0 expires at 1060
    store.add(adapters[2], "b0", "bob", vec, **fields)  # another key's quota is its own
    now[0] += 31  # m0 has expired: it is never served and is swept
    assert store.get("m0") is None and "m0" not in store
    store.add(adapters[2], "m2", "alice", vec, **fields)
    assert "m0" in dropped and not (tmp_path / "kept" / "experts" / "m0").exists()
    store.close()
    reopened = open_store()  # owners and expiries survive
    assert sorted(e.id for e in reopened.list()) == ["b0", "m1", "m2"] and reopened.used("alice") == 2 * size
    reopened.close()

    with TestClient(make_app(world)) as c:  # over HTTP: 429 with the seconds until one expires
        c.app.state.service.kept.quota_bytes = 1
        refused = c.post("/v1/adapters", json={"description": "Reverse the word order."}, headers=AUTH)
        assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
        assert "quota" in refused.json()["error"]["message"]
        assert "(DELETE /v1/adapters/{id})" in refused.json()["error"]["message"]  # where to free space
        assert (
            c.post(
                "/v1/adapters", json={"description": "Reverse the word order.", "store": False}, headers=AUTH
            ).status_code
            == 201
        )


def test_the_same_mint_kept_twice_at_once_gets_one_id(world):
    """Kept mints are written by two files workers at once: the same description minted by two requests at
    the same moment gets the same content id and both requests succeed; a racing add of an id being kept
    never drops the first one's entry."""
    from concurrent.futures import ThreadPoolExecutor

    from loramint.service.core import Service
    from loramint.service.schemas import MintRequest

    service = Service.load(world["config"], library=world["library"], minter=world["minter"])
    write = service.kept.lib.add

    def slow_write(*args, **kwargs):  # a slow disk: the second request arrives while the first one writes
        time.sleep(0.3)
        return write(*args, **kwargs)

    service.kept.lib.add = slow_write
    try:
        for attempt in range(4):
            req = MintRequest(description=f"Count the vowels, attempt {attempt}.")
            adapter = world["minter"].mint(req.description)
            drawn = {"experts": [], "confidence": 1.0}
            with ThreadPoolExecutor(2) as pool:
                jobs = [pool.submit(service._keep, req, adapter, drawn, "alice") for _ in range(2)]
                infos = [job.result() for job in jobs]
            assert infos[0].id == infos[1].id and infos[0].id in service.kept
            vec = world["library"].encoder.encode(req.description)
            fields = {"name": "m", "description": req.description, "family": "minted"}
            with pytest.raises(AlreadyExistsError):
                service.kept.add(adapter, infos[0].id, "alice", vec, **fields)
            assert service.kept.get(infos[0].id) is not None  # the racing add left the kept one alone
    finally:
        service.close()


def test_the_runtime_serves_the_modules_in_use(world, tiny):
    """Left to itself the service's runtime targets what the generator mints for and the library's experts
    use (not every linear layer), so its resident slots cost what they need."""
    from loramint.service.core import Service

    config = replace(world["config"], target_modules=None)
    service = Service.load(config, library=world["library"], minter=world["minter"])
    try:
        served = {module.rsplit(".", 1)[-1] for module in service.runtime.stack.shapes}
        expected = set(world["minter"].layout.module_types)
        expected |= {m for e in world["library"].list() for m in e.target_modules}
        assert served == expected and served < {
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        }
    finally:
        service.close()


def test_n_above_1_says_n_must_be_1(client):
    for path, body in (
        ("/v1/completions", {"model": BASE, "prompt": "2 + 2 =", "n": 2}),
        ("/v1/chat/completions", {"model": BASE, "messages": [{"role": "user", "content": "hi"}], "n": 3}),
    ):
        response = client.post(path, json=body)
        assert response.status_code == 422
        assert "it must be 1: decoding is greedy" in response.json()["error"]["message"]


def test_a_full_disk_is_a_documented_507_and_stores_nothing(world, monkeypatch):
    """ENOSPC (or a quota, or a file-size limit) while writing answers 507 with Retry-After, naming no path;
    nothing half-written is left behind and the service goes on answering."""
    import errno

    with TestClient(make_app(world)) as c:
        service = c.app.state.service
        before = library_state(world)

        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device", "/srv/data/minted/x")

        monkeypatch.setattr(service.kept, "add", full)
        response = c.post("/v1/adapters", json={"description": "Count the vowels."}, headers=AUTH)
        assert response.status_code == 507 and response.headers["Retry-After"] == "60"
        assert error_type(response) == "StorageFullError" and "/srv" not in response.text
        monkeypatch.setattr(world["library"], "add", full)
        assert upload(c, adapter_zip(LoraAdapter.random("tiny-llama", r=2, seed=21))).status_code == 507
        assert library_state(world) == before
        assert c.get("/healthz").status_code == 200


# ---- fallback: the base model when nothing fits ------------------------------------------------------------
def test_a_mint_far_from_every_expert_falls_back_to_the_base_model(world):
    with TestClient(make_app(world, fallback_min_confidence=0.999)) as c:
        before = {m["id"] for m in c.get("/v1/models").json()["data"]}
        r = c.post("/v1/adapters", json={"description": "Answer like a pirate."}, headers=AUTH)
        assert r.status_code == 200, r.text  # nothing created
        body = r.json()
        assert body["fell_back"] is True and body["id"] == BASE and body["download_url"] is None
        minted = body["metrics"]["minted"]
        assert minted["fell_back"] is True and "best similarity" in minted["fallback_reason"]
        assert minted["confidence"] < 0.999 and minted["experts"]
        assert {m["id"] for m in c.get("/v1/models").json()["data"]} == before  # nothing kept
        done = c.post("/v1/completions", json={"model": body["id"], "prompt": "hello", "max_tokens": 3})
        assert done.status_code == 200
        metrics = c.get("/metrics").text
    assert _sample(metrics, "loramint_mint_fallbacks_total", reason="confidence") == 1


def test_solved_examples_check_the_minted_adapter_against_the_base_model(world, tiny):
    """The check's numbers are the base model's and the adapter's answer loss on the examples, the same as
    scoring them one by one with the adapter applied; the decision follows `fallback_min_gain`."""
    from loramint.fallback import solved_task
    from loramint.training.data import answer_nll_per_example

    solved = [{"input": "3 plus 4", "output": "7"}, {"input": "10 plus 1", "output": "11"}]
    body = {"description": "Add one to the number.", "examples": solved, "store": False}
    with TestClient(make_app(world, fallback_min_gain=-1e9)) as c:
        kept = c.post("/v1/adapters", json=body, headers=AUTH)
        assert kept.status_code == 201, kept.text
        info = kept.json()
        assert info["fell_back"] is False and info["metrics"]["minted"]["fell_back"] is False
        check = info["metrics"]["minted"]["check"]
        adapter = c.app.state.service.adapter(info["id"])
    task = solved_task(body["description"], [(e["input"], e["output"]) for e in solved])
    plain = tiny  # the unwrapped model: scored the plain way, one example at a time
    want_base = answer_nll_per_example(plain.model, plain.tokenizer, task, task.examples).mean()
    with apply_lora(plain.model, adapter):
        want_minted = answer_nll_per_example(plain.model, plain.tokenizer, task, task.examples).mean()
    assert check["examples"] == 2
    assert check["base_nll"] == pytest.approx(want_base, abs=1e-3)
    assert check["minted_nll"] == pytest.approx(want_minted, abs=1e-3)

    with TestClient(make_app(world, fallback_min_gain=1e9)) as c:
        r = c.post("/v1/adapters", json=body, headers=AUTH)
        assert r.status_code == 200 and r.json()["fell_back"] is True and r.json()["id"] == BASE
        assert "did not beat the base model" in r.json()["metrics"]["minted"]["fallback_reason"]
        assert r.json()["metrics"]["minted"]["check"]["examples"] == 2
        assert not any(i.startswith("check-") for i in c.app.state.service.runtime.stack.ids)  # probe gone
        metrics = c.get("/metrics").text
    assert _sample(metrics, "loramint_mint_fallbacks_total", reason="examples") == 1


def test_bad_solved_examples_are_refused_clearly(client):
    for examples, fragment in [
        ([{"input": "x"}], "output"),
        ([{"input": "x", "output": ""}], "output"),
        ([{"input": "x", "output": "y", "extra": 1}], "extra"),
        ([{"input": "x" * 3000, "output": "y" * 3000}], "input and output together"),
    ]:
        r = client.post("/v1/adapters", json={"description": "d", "examples": examples}, headers=AUTH)
        assert r.status_code == 422 and fragment in r.text, (examples, r.text[:300])


def test_a_request_retried_alone_after_its_batch_failed_mints_from_its_example_texts(world):
    """When a batch's one decoder pass fails, each request is minted alone: a request with solved examples
    conditions on their texts there too (the generator takes texts, not example objects)."""

    class FailsInBatches:
        layout = world["minter"].layout

        def mint_many(self, texts, shots=None, *args, **kwargs):
            if len(texts) > 1:
                raise GeneratorError("this batch cannot be decoded")
            return world["minter"].mint_many(texts, shots, *args, **kwargs)

        def mint(self, description, examples=None, *args, **kwargs):
            return world["minter"].mint(description, examples, *args, **kwargs)

        def provenance(self, *args, **kwargs):
            return world["minter"].provenance(*args, **kwargs)

    from loramint.service.core import PendingCheck
    from loramint.service.schemas import MintRequest

    solved = [{"input": "3 plus 4", "output": "7"}, {"input": "1 plus 1", "output": "2"}]
    with TestClient(make_app(world, minter=FailsInBatches())) as c:
        service = c.app.state.service
        results = service.mint_batch(
            [
                MintRequest(description="Add one to the number.", examples=solved, store=False),
                MintRequest(description="Tell a bedtime story about the moon.", store=False),
            ]
        )
    assert isinstance(results[0], PendingCheck), results[0]
    want = world["minter"].mint("Add one to the number.", ["3 plus 4\n7", "1 plus 1\n2"])
    assert results[0].adapter.content_hash() == want.content_hash()
    assert results[1].id.startswith("minted-")
