"""Records end to end over a real socket: `sdfc serve` (local dispatch) → writer → MariaDB or SQLite, and the
gallery JSON API behind the same Basic auth."""
from __future__ import annotations

import base64
import io
import time

import pytest
import requests
from PIL import Image

from sdfc.records import open_store

from . import mariadb
from .live_server import PASSWORD, USER, start_server

SMALL = dict(width=64, height=64, steps=2)


@pytest.fixture(scope="module", params=["sqlite", "mysql"])
def deployment(request, tmp_path_factory):
    """(server, store) with the records room on the given backend."""
    tmp = tmp_path_factory.mktemp(f"records-{request.param}")
    if request.param == "mysql":
        with mariadb.temp_database() as name:
            yield from _serve(tmp, mariadb.url(name))
    else:
        yield from _serve(tmp, f"sqlite:///{tmp / 'records.db'}")


def _serve(tmp, database_url):
    server = start_server(tmp, env={"SDFC_DATABASE_URL": database_url, "SDFC_DISPATCH": "local"})
    store = open_store(database_url)
    try:
        yield server, store
    finally:
        server.stop()
        store.close()


def session() -> requests.Session:
    s = requests.Session()
    s.auth = (USER, PASSWORD)
    return s


def wait_for_row(store, prompt: str, index: int = 0, timeout: float = 20) -> dict:
    """The record of the (only) generation with this prompt: each generation gets its own record key, so
    tests find their rows by what they asked for."""
    p = store.placeholder
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = store._fetch(f"SELECT `id` FROM `generated_images` WHERE `prompt` = {p} AND `image_index` = {p}",
                            (prompt, index))
        if rows:
            assert len(rows) == 1, f"{len(rows)} records for {prompt!r}/{index}"
            return store.get(rows[0]["id"], with_image=True)
        time.sleep(0.05)
    raise AssertionError(f"no record for {prompt!r}/{index} after {timeout}s")


def txt2img(server, **payload) -> requests.Response:
    return session().post(server.url + "/sdapi/v1/txt2img", json={**SMALL, **payload}, timeout=60)


def test_txt2img_row_holds_the_generation_and_the_exact_png(deployment):
    server, store = deployment
    response = txt2img(server, prompt="a lighthouse, at dusk", negative_prompt="fog", seed=-1,
                       sampler_name="Euler a", cfg_scale=6.5, batch_size=2)
    assert response.status_code == 200, response.text
    body = response.json()
    info = __import__("json").loads(body["info"])
    for index in (0, 1):
        row = wait_for_row(store, "a lighthouse, at dusk", index)
        assert row["seed"] == str(info["all_seeds"][index]) and row["seed"] != "-1"
        assert {k: row[k] for k in ("prompt", "negative_prompt", "steps", "sampler", "cfg_scale", "size",
                                    "model_hash", "model")} == {
            "prompt": "a lighthouse, at dusk", "negative_prompt": "fog", "steps": "2", "sampler": "Euler a",
            "cfg_scale": "6.5", "size": "64x64", "model_hash": info["sd_model_hash"], "model": info["sd_model_name"]}
        assert base64.b64decode(row["image_base64"]) == base64.b64decode(body["images"][index])
        assert row["infotext"] == info["infotexts"][index] and row["image_format"] == "png"


def test_gallery_api(deployment):
    server, store = deployment
    response = txt2img(server, prompt="gallery probe 🎨", seed=7, cfg_scale=5)
    client_png = base64.b64decode(response.json()["images"][0])
    row = wait_for_row(store, "gallery probe 🎨")
    assert requests.get(server.url + "/gallery/api/images", timeout=10).status_code == 401

    listing = session().get(server.url + "/gallery/api/images", params={"q": "probe 🎨", "page_size": 5}).json()
    assert listing["total"] == 1 and listing["page"] == 1 and listing["pages"] == 1
    item = listing["items"][0]
    assert item["id"] == row["id"] and item["seed"] == 7 and item["cfg_scale"] == 5.0 and item["steps"] == 2
    assert item["prompt"] == "gallery probe 🎨" and item["created_at"].endswith("Z")
    assert "image_base64" not in item

    one = session().get(server.url + f"/gallery/api/images/{row['id']}", params={"include": "image"}).json()
    assert one["infotext"] == row["infotext"] and base64.b64decode(one["image_base64"]) == client_png

    download = session().get(server.url + item["image_url"])
    assert download.status_code == 200 and download.headers["Content-Type"] == "image/png"
    assert "attachment" in download.headers["Content-Disposition"]
    assert download.content == client_png
    assert Image.open(io.BytesIO(download.content)).text["parameters"] == row["infotext"]

    today = time.strftime("%Y-%m-%d", time.gmtime())
    by_model = session().get(server.url + "/gallery/api/images",
                             params={"model": row["model"], "since": today, "until": today}).json()
    assert row["id"] in [i["id"] for i in by_model["items"]]
    assert session().get(server.url + "/gallery/api/images", params={"since": "2000-01-01",
                                                                      "until": "2000-01-02"}).json()["total"] == 0
    assert session().get(server.url + "/gallery/api/models").json()["models"] == [row["model"]]
    missing = session().get(server.url + "/gallery/api/images/999999")
    assert missing.status_code == 404 and missing.json()["error"] == "NotFound"
    bad = session().get(server.url + "/gallery/api/images", params={"page_size": 1000})
    assert bad.status_code == 400 and "page_size" in bad.json()["detail"]
    assert session().get(server.url + "/gallery/api/images", params={"since": "yesterday"}).status_code == 400


HOSTILE = {"quotes": "it's \"quoted\" `back` \\slash", "drop": "'; DROP TABLE generated_images; --",
           "nul": "nul\x00byte", "emoji": "emoji 🎨🌊👩‍🚀 and 中文"}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_prompts_over_http_are_stored_verbatim(deployment, name):
    server, store = deployment
    prompt = HOSTILE[name]
    response = txt2img(server, prompt=prompt, negative_prompt=prompt)
    assert response.status_code == 200, response.text
    row = wait_for_row(store, prompt)
    assert row["prompt"] == prompt and row["negative_prompt"] == prompt
    assert store.count() >= 1  # the table is still there


def test_a_prompt_too_long_to_record_is_refused_with_a_clear_400(deployment):
    server, store = deployment
    before = store.count()
    response = txt2img(server, prompt="x" * 100_000)
    assert response.status_code == 400
    assert "prompt is 100000 bytes in UTF-8, over the limit of 65535" in response.json()["detail"]
    assert store.count() == before
