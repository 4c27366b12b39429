"""TransCap: attribute dictionaries, phrase backends, the caption checker and caption sampling."""

from __future__ import annotations

import itertools
import json
import socket
import sys
import threading
import time
import types
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import numpy as np
import pytest
from conftest import write_image

from medvqa_lib.data.schema import LabelledImage
from medvqa_lib.data.synthetic import load_synthetic_labelled
from medvqa_lib.errors import DataError, HubUnavailableError
from medvqa_lib.transcap import (
    CLASSES,
    NO_OPACITY,
    ZONES,
    CachedBackend,
    CaptionBackend,
    CaptionBackendError,
    HFTextGenerationBackend,
    LLMBackend,
    OpenAIChatBackend,
    RuleBackend,
    TransCapCaptions,
    attribute_dict,
    attribute_prompt,
    build_banks,
    build_captions,
    check_caption,
    examples_table,
    load_prompt,
    load_rsna_csv,
    parse_phrasings,
    pretraining_items,
    sample_caption,
)

# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def synthetic_items() -> list[LabelledImage]:
    return load_synthetic_labelled(n_labelled=30, image_size=64)


def slake_item(image_id: str, organs: list[str], diseases: list[str], split: str = "train",
               modality: str = "ct", location: str = "Abdomen") -> LabelledImage:
    """A LabelledImage shaped like load_slake_detection's output."""
    labels = organs + diseases
    return LabelledImage(
        image_id=image_id, image=f"imgs/{image_id}/source.jpg", split=split, dataset="slake",
        attributes={"modality": modality, "organ": location.lower(), "location": location,
                    "labels": labels, "boxes": [[1.0, 2.0, 3.0, 4.0]] * len(labels),
                    "organs": organs, "diseases": diseases},
    )


RSNA_ROWS = [
    # two opacities of one patient: image-left upper (patient's right), image-right lower
    "p1,100,200,150,100,1",
    "p1,700,600,120,200,1",
    "p2,,,,,0",
    "p3,,,,,0",
    "p4,600,100,100,100,1",
]


def write_rsna(folder: Path, rows: list[str] = RSNA_ROWS,
               header: str = "patientId,x,y,width,height,Target") -> tuple[Path, Path]:
    images = folder / "images"
    for pid in {r.split(",")[0] for r in rows}:
        write_image(images / f"{pid}.png")
    csv_path = folder / "labels.csv"
    csv_path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return csv_path, images


LUNG_OPACITY = {"modality": "CXR", "class": "Lung Opacity", "nums": 2,
                "location": ["upper left", "upper right"]}
NORMAL = {"modality": "CXR", "class": "Normal", "nums": 0, "location": []}
NOT_NORMAL = {"modality": "CXR", "class": "No Lung Opacity / Not Normal", "nums": 0,
              "location": []}


# ----------------------------------------------------------------------------- attribute dicts


def test_synthetic_attribute_dicts(synthetic_items):
    by_id = {item.image_id: item for item in synthetic_items}
    assert attribute_dict(by_id["synlab-000000"]) == {
        "modality": "CXR", "plane": "PA", "class": "Lung Opacity", "nums": 3,
        "location": ["upper left", "upper right", "lower right"]}
    assert attribute_dict(by_id["synlab-000002"]) == {
        "modality": "CXR", "plane": "PA", "class": "Normal", "nums": 0, "location": []}
    assert attribute_dict(by_id["synlab-000007"])["class"] == "No Lung Opacity / Not Normal"
    for item in pretraining_items(synthetic_items):
        attrs = attribute_dict(item)
        assert attrs["nums"] == item.attributes["n_opacities"]
        assert (attrs["class"] == "Lung Opacity") == (attrs["nums"] > 0)


def test_rsna_csv(tmp_path):
    csv_path, images = write_rsna(tmp_path)
    classes = tmp_path / "classes.csv"
    classes.write_text("patientId,class\np1,Lung Opacity\np1,Lung Opacity\np2,Normal\n"
                       "p3,No Lung Opacity/Not Normal\np4,Lung Opacity\n", encoding="utf-8")
    items = {i.image_id: i for i in load_rsna_csv(csv_path, images, class_csv=classes)}
    assert set(items) == {"p1", "p2", "p3", "p4"}
    assert items["p1"].attributes["boxes"] == [[100.0, 200.0, 150.0, 100.0],
                                               [700.0, 600.0, 120.0, 200.0]]
    # image left = patient's right; image right = patient's left
    assert items["p1"].attributes["locations"] == ["right upper lung", "left lower lung"]
    assert attribute_dict(items["p1"]) == {"modality": "CXR", "class": "Lung Opacity", "nums": 2,
                                           "location": ["upper right", "lower left"]}
    assert attribute_dict(items["p2"]) == {"modality": "CXR", "class": "Normal", "nums": 0,
                                           "location": []}
    assert attribute_dict(items["p3"])["class"] == "No Lung Opacity / Not Normal"
    assert attribute_dict(items["p4"])["location"] == ["upper left"]
    assert items["p1"].image == images / "p1.png" and items["p1"].split == "train"
    without = {i.image_id: i for i in load_rsna_csv(csv_path, images)}
    assert attribute_dict(without["p2"])["class"] == NO_OPACITY


def test_rsna_csv_errors(tmp_path):
    csv_path, images = write_rsna(tmp_path, header="patientId,x,y,width,Target")
    with pytest.raises(DataError, match="height"):
        load_rsna_csv(csv_path, images)
    with pytest.raises(DataError, match="not found"):
        load_rsna_csv(tmp_path / "missing.csv", images)
    csv_path, images = write_rsna(tmp_path / "ok")
    (images / "p2.png").unlink()
    with pytest.raises(DataError, match="p2"):
        load_rsna_csv(csv_path, images)
    bad_class = tmp_path / "classes.csv"
    bad_class.write_text("patientId,class\np1,Normal\np2,Normal\np3,Normal\np4,Normal\n")
    write_image(images / "p2.png")
    with pytest.raises(DataError, match="disagrees"):
        load_rsna_csv(csv_path, images, class_csv=bad_class)


def test_slake_attribute_dicts():
    item = slake_item("xmlab0", ["Liver", "Left Kidney"], ["Liver Cancer"])
    assert attribute_dict(item) == {"modality": "CT", "location": "abdomen",
                                    "organ": ["liver", "left kidney"],
                                    "pathology": ["liver cancer"]}
    head = slake_item("xmlab9", ["Brain"], [], modality="mri", location="Brain_Tissue")
    assert attribute_dict(head) == {"modality": "MRI", "location": "head", "organ": ["brain"],
                                    "pathology": []}
    lung = slake_item("xmlab3", ["Heart"], ["Cardiomegaly"], modality="x-ray",
                      location="Chest_heart")
    assert attribute_dict(lung)["location"] == "chest"
    assert attribute_dict(lung)["modality"] == "X-ray"


def test_test_split_refused(synthetic_items):
    with pytest.raises(DataError, match="test"):
        attribute_dict(slake_item("xmlab4", ["Brain"], ["Brain Edema"], split="test"))
    test_item = next(i for i in synthetic_items if i.split == "test")
    with pytest.raises(DataError, match="test"):
        build_captions([test_item])
    assert all(i.split == "train" for i in pretraining_items(synthetic_items))


def test_slake_detection_loader_feeds_transcap(fake_slake):
    from medvqa_lib.data.slake import load_slake_detection

    items = load_slake_detection("train", fake_slake)
    captions, report = build_captions(items)
    assert len(captions) == len(items) and report.dropped_total >= 0
    with pytest.raises(DataError):
        attribute_dict(load_slake_detection("test", fake_slake)[0])


# ----------------------------------------------------------------------------- checker


@pytest.mark.parametrize("caption, attrs, attribute", [
    ("This chest X-ray shows three lung opacities.", LUNG_OPACITY, "nums"),
    ("A single opacity is seen in the left upper zone.", LUNG_OPACITY, "nums"),
    ("The chest X-ray appears normal.", LUNG_OPACITY, "class"),
    ("There is no lung opacity.", LUNG_OPACITY, "class"),
    ("This chest X-ray shows an abnormality.", NORMAL, "class"),
    ("Two opacities are seen.", NORMAL, "class"),
    ("The image looks normal.", NOT_NORMAL, "class"),
    ("Opacities lie in the lower zones.", LUNG_OPACITY, "location"),
    ("The opacity is in the right lung.", {**LUNG_OPACITY, "nums": 1, "location": ["upper left"]},
     "location"),
    ("Bilateral opacities.", {**LUNG_OPACITY, "location": ["upper left", "lower left"]},
     "location"),
    ("This CT scan shows lung opacity.", LUNG_OPACITY, "modality"),
    ("A lateral view showing lung opacity.", {**LUNG_OPACITY, "plane": "PA"}, "plane"),
    ("The CT shows the liver and the right kidney.",
     {"modality": "CT", "organ": ["liver", "left kidney"], "pathology": []}, "organ"),
    ("The CT shows a nodule.",
     {"modality": "CT", "organ": ["liver"], "pathology": ["liver cancer"]}, "pathology"),
    ("The liver is normal.",
     {"modality": "CT", "organ": ["liver"], "pathology": ["liver cancer"]}, "pathology"),
    ("A lesion is seen.", {"modality": "CT", "organ": ["liver"], "pathology": []}, "pathology"),
])
def test_checker_flags(caption, attrs, attribute):
    problems = check_caption(caption, attrs)
    assert any(p.startswith(attribute + ":") for p in problems), problems


@pytest.mark.parametrize("caption, attrs", [
    ("This chest X-ray reveals abnormalities in the lung, with the presence of 2 lung opacities "
     "located at the upper left and upper right.", LUNG_OPACITY),
    ("The displayed lung in this chest X-ray appears normal, with no observed lung opacities.",
     NORMAL),
    ("This X-ray of the chest reveals an abnormality in the displayed lung, without any lung "
     "opacities.", NOT_NORMAL),
    ("Two opacities are seen in both upper zones; no opacity at the lung bases.", LUNG_OPACITY),
    ("The left lung shows no opacity.", {**LUNG_OPACITY, "nums": 1, "location": ["upper right"]}),
    ("This CT scan of the abdomen shows a liver tumor next to the left kidney.",
     {"modality": "CT", "organ": ["left kidney"], "pathology": ["liver cancer"]}),
    ("This MRI of the head shows no lesion. The brain is visible.",
     {"modality": "MRI", "location": "head", "organ": ["brain"], "pathology": []}),
])
def test_checker_passes(caption, attrs):
    assert check_caption(caption, attrs) == []


def _all_cxr_dicts() -> list[dict]:
    out = [{**NORMAL}, {**NOT_NORMAL}, {**NORMAL, "class": NO_OPACITY}]
    for k in range(1, 5):
        for zones in itertools.combinations(ZONES, k):
            out += [{**LUNG_OPACITY, "nums": n, "location": list(zones)} for n in (k, k + 1)]
    return out + [{**d, "plane": "AP"} for d in out[:6]]


def _slake_dicts(rng: np.random.Generator, n: int) -> list[dict]:
    organs = ["liver", "spleen", "left kidney", "right kidney", "left lung", "right lung",
              "heart", "brain", "colon", "bladder", "temporal lobe"]
    diseases = ["liver cancer", "lung cancer", "nodule", "mass", "cardiomegaly", "effusion",
                "brain edema", "brain enhancing tumor", "pneumonia", "atelectasis", "cyst"]
    return [{"modality": str(rng.choice(["CT", "MRI", "X-ray"])),
             "location": str(rng.choice(["abdomen", "chest", "head", "pelvis"])),
             "organ": [str(o) for o in rng.choice(organs, rng.integers(0, 4), replace=False)],
             "pathology": [str(d) for d in rng.choice(diseases, rng.integers(0, 3), replace=False)]}
            for _ in range(n)]


def test_sampled_captions_never_contradict(synthetic_items):
    rng = np.random.default_rng(0)
    dicts = _all_cxr_dicts() + _slake_dicts(rng, 60)
    dicts += [attribute_dict(i) for i in pretraining_items(synthetic_items)]
    banks = build_banks(dicts, RuleBackend(), n_phrasings=10)
    for attrs in dicts:
        for _ in range(25):
            caption = sample_caption(attrs, banks, rng)
            assert check_caption(caption, attrs) == [], (attrs, caption)


# ----------------------------------------------------------------------------- backends


def test_rule_backend_deterministic(synthetic_items):
    a, b = RuleBackend(), RuleBackend()
    assert a.phrasings("class", "Lung Opacity", 3) == b.phrasings("class", "Lung Opacity", 3)
    assert len(a.phrasings("nums", 2, 5)) == 5 and "two lung opacities" in a.phrasings("nums", 2, 5)
    assert a.phrasings("location", [], 5) == []
    items = pretraining_items(synthetic_items)
    first, report = build_captions(items, captions_per_image=2, seed=3)
    second, _ = build_captions(items, captions_per_image=2, seed=3)
    assert [c.caption for c in first] == [c.caption for c in second]
    assert len(first) == 2 * len(items) and report.images == len(items)
    assert report.captions == len(first) and report.phrasings["class"] > 0
    assert [c.caption for c in build_captions(items, seed=4)[0]] != [c.caption for c in first[::2]]


def test_transcap_captions_epochs(synthetic_items):
    items = pretraining_items(synthetic_items)
    data = TransCapCaptions(items, seed=1)
    again = TransCapCaptions(items, seed=1)
    epoch0 = [data[i].caption for i in range(len(data))]
    assert epoch0 == [again[i].caption for i in range(len(again))]
    assert data[0].caption == data[0].caption  # same (seed, epoch, index), same caption
    data.set_epoch(1)
    epoch1 = [data[i].caption for i in range(len(data))]
    assert epoch1 != epoch0
    assert data[-1].image_id == items[-1].image_id and data[0].extra["epoch"] == 1
    with pytest.raises(IndexError):
        data[len(data)]


class CountingBackend(CaptionBackend):
    name = "counting"

    def __init__(self) -> None:
        super().__init__()

    def phrasings(self, attribute, value, n):
        self.calls += 1
        return RuleBackend().phrasings(attribute, value, n)


def test_cache_avoids_second_call(tmp_path, synthetic_items):
    items = pretraining_items(synthetic_items)[:8]
    inner = CountingBackend()
    first, _ = build_captions(items, backend=CachedBackend(inner, tmp_path / "cache"))
    calls = inner.calls
    assert calls > 0 and len(list((tmp_path / "cache").glob("*.json"))) == calls
    second, _ = build_captions(items, backend=CachedBackend(inner, tmp_path / "cache"))
    assert inner.calls == calls
    assert [c.caption for c in first] == [c.caption for c in second]


class CannedLLM(LLMBackend):
    name = "canned"

    def __init__(self, answer: str) -> None:
        super().__init__()
        self.answer = answer

    def complete(self, prompt: str) -> str:
        self.calls += 1
        return self.answer


def test_malformed_lines_rejected_and_counted(tmp_path):
    answer = ("Here are five phrasings:\n1. Shows lung opacity.\n2) shows lung opacity\n"
              "- \n\n* \"Reveals opacification of the lungs\"\n"
              "- " + "very " * 30 + "long\n• appears normal\n")
    kept, rejected = parse_phrasings(answer, 5)
    assert kept == ["shows lung opacity", "reveals opacification of the lungs", "appears normal"]
    assert rejected == {"malformed": 1, "duplicate": 1, "empty": 1, "overlong": 1}
    backend = CachedBackend(CannedLLM(answer), tmp_path)
    banks = build_banks([LUNG_OPACITY], backend, n_phrasings=5)
    assert banks[("class", "Lung Opacity")] == kept[:2]  # "appears normal" contradicts the value
    assert backend.rejected["class"] == 4
    again = CachedBackend(CannedLLM(answer), tmp_path)
    again.phrasings("class", "Lung Opacity", 5)
    assert again.rejected["class"] == 4 and again.backend.calls == 0


def test_report_counts_and_fallback():
    nonsense = CannedLLM("1. appears normal\n2. Sure, here you go:")
    _, report = build_captions([LabelledImage("a", "a.png", {"class": "Lung Opacity",
                                                             "n_opacities": 1,
                                                             "locations": ["left upper lung"]})],
                               backend=nonsense)
    assert report.fallbacks["class"] == 1 and report.rejected_malformed["class"] >= 1
    assert report.rejected_checker["class"] == 1
    assert set(report.table().columns) >= {"attribute", "captions_dropped"}


def test_prompt_files():
    text = attribute_prompt("nums", 2, 5)
    assert "5" in text and "nums" in text and "{" not in text
    assert load_prompt("transcap_system").strip()
    with pytest.raises(KeyError):
        load_prompt("no_such_prompt")


class _ChatHandler(BaseHTTPRequestHandler):
    requests: list = []

    def do_POST(self):  # noqa: N802 (http.server's method name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _ChatHandler.requests.append((self.path, body))
        answer = {"choices": [{"message": {"role": "assistant",
                                           "content": "1. shows lung opacity\n"
                                                      "2. Demonstrates pulmonary opacity."}}]}
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_openai_backend_local_server():
    server = HTTPServer(("127.0.0.1", 0), _ChatHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/v1"
        backend = OpenAIChatBackend(url, "tiny", timeout=5)
        assert backend.phrasings("class", "Lung Opacity", 3) == [
            "shows lung opacity", "demonstrates pulmonary opacity"]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    path, body = _ChatHandler.requests[-1]
    assert path == "/v1/chat/completions" and body["model"] == "tiny"
    assert "Lung Opacity" in body["messages"][-1]["content"]


def test_openai_backend_connection_refused():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = OpenAIChatBackend(f"http://127.0.0.1:{port}/v1", "tiny", timeout=3)
    start = time.monotonic()
    with pytest.raises(CaptionBackendError, match="backend='rule'") as err:
        backend.phrasings("class", "Normal", 3)
    assert f"127.0.0.1:{port}" in str(err.value)
    assert time.monotonic() - start < 5


def test_openai_backend_times_out():
    with socket.socket() as listener:  # accepts connections but never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
        backend = OpenAIChatBackend(url, "tiny", timeout=1)
        start = time.monotonic()
        with pytest.raises(CaptionBackendError, match="within 1 s"):
            backend.phrasings("class", "Normal", 3)
        assert time.monotonic() - start < 5


def test_hf_backend_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    backend = HFTextGenerationBackend("some-org/not-a-local-model")
    start = time.monotonic()
    with pytest.raises(HubUnavailableError, match="not-a-local-model"):
        backend.phrasings("class", "Normal", 3)
    assert time.monotonic() - start < 2


class _FakePipeline:
    def __init__(self, chat: bool) -> None:
        self.tokenizer = types.SimpleNamespace(chat_template="{{ x }}" if chat else None)
        self.inputs: list = []

    def __call__(self, inputs, **kw):
        self.inputs.append((inputs, kw))
        answer = "1. appears normal\n2. Looks unremarkable.\n3. appears normal"
        if isinstance(inputs, list):  # a chat: the answer comes back as the last message
            return [{"generated_text": [*inputs, {"role": "assistant", "content": answer}]}]
        return [{"generated_text": answer}]


@pytest.mark.parametrize("chat", [True, False])
def test_hf_backend_local_folder(monkeypatch, tmp_path, chat):
    made: dict = {}
    fake = _FakePipeline(chat)

    def pipeline(task, **kw):
        made.update(task=task, **kw)
        return fake

    monkeypatch.setitem(sys.modules, "transformers", types.SimpleNamespace(pipeline=pipeline))
    backend = HFTextGenerationBackend(tmp_path, max_new_tokens=40)
    assert backend.phrasings("class", "Normal", 5) == ["appears normal", "looks unremarkable"]
    assert backend.rejected["class"] == 1
    assert made["task"] == "text-generation" and made["trust_remote_code"] is False
    assert made["model"] == str(tmp_path)
    inputs, kw = fake.inputs[-1]
    assert kw["do_sample"] is False and kw["max_new_tokens"] == 40
    assert isinstance(inputs, list) == chat


# ----------------------------------------------------------------------------- Fig. 3


def test_examples_table(synthetic_items):
    table = examples_table(pretraining_items(synthetic_items), k=3)
    assert list(table.columns) == ["image_id", "attributes", "caption"]
    assert len(table) == 3
    shown = {c for c in CLASSES if any(f"Class: {c};" in a for a in table["attributes"])}
    assert shown == set(CLASSES)
    assert all(table["caption"].str.endswith("."))
