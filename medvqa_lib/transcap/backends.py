"""Caption backends: where the alternative phrasings of an attribute value come from.

Every backend answers ``phrasings(attribute, value, n) -> list[str]``:

* :class:`RuleBackend` -- the hand-written banks of :mod:`~medvqa_lib.transcap.phrases`
  (offline, deterministic, the default);
* :class:`HFTextGenerationBackend` -- a local or Hub text-generation model through
  ``transformers.pipeline`` (greedy decoding, never ``trust_remote_code``);
* :class:`OpenAIChatBackend` -- any OpenAI-compatible ``/chat/completions`` endpoint (ollama,
  vLLM, hosted APIs) through the standard library only;
* :class:`CachedBackend` -- wraps any backend and keeps its answers on disk, so a re-run never
  calls the model again.

Language-model backends fill the prompt ``prompts/transcap_attribute.txt`` and parse the
answer with :func:`parse_phrasings`; malformed lines are rejected and counted per attribute
in ``backend.rejected``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import urllib.error
import urllib.request
from collections import Counter
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from medvqa_lib.errors import HubUnavailableError, MedVQAError, unknown_name
from medvqa_lib.transcap.phrases import VALUE_NOTES, form_of, rule_phrasings, value_key

log = logging.getLogger(__name__)

MAX_WORDS = 16
MAX_CHARS = 120
RULES_VERSION = 1


class CaptionBackendError(MedVQAError, RuntimeError):
    """A caption backend (language-model server or model) failed."""


# ----------------------------------------------------------------------------- prompts


def load_prompt(name: str) -> str:
    """The text of ``medvqa_lib/prompts/<name>.txt``."""
    folder = resources.files("medvqa_lib").joinpath("prompts")
    path = folder.joinpath(f"{name}.txt")
    if not path.is_file():
        names = [p.name[:-4] for p in folder.iterdir() if p.name.endswith(".txt")]
        raise unknown_name("prompt", name, names)
    return path.read_text(encoding="utf-8")


def attribute_prompt(attribute: str, value: Any, n: int) -> str:
    """The filled-in prompt asking for ``n`` phrasings of ``attribute = value``."""
    shown = value_key(value)
    note = VALUE_NOTES.get(shown, "")
    if attribute == "nums":
        note = "number of lung opacities on a chest X-ray (0 means none)"
    elif attribute == "location" and isinstance(value, (list, tuple)):
        note = ("lung zones that contain opacities, from the patient's point of view "
                "(the patient's left is on the image right)")
    return load_prompt("transcap_attribute").format(
        attribute=attribute, value=shown, note=note or "as stated", form=form_of(attribute, value),
        n=n, max_words=MAX_WORDS,
    )


# ----------------------------------------------------------------------------- parsing

_BULLET = re.compile(r"^\s*(?:[-*\u2022\u00b7\u2013\u2014>]+|\(?\d{1,2}[.):\]]|\(?[a-zA-Z][.)])\s*")
_PREAMBLE = re.compile(r"^(?:here (?:are|is)|sure|certainly|okay|of course|alternative|"
                       r"phrasings?|variations?|answer)\b", re.I)


def _clean_line(line: str) -> str:
    text = line.strip()
    for _ in range(3):
        text = _BULLET.sub("", text, count=1).strip()
    text = text.strip("*_`\"'\u201c\u201d\u2018\u2019 ").rstrip(".;,").strip()
    text = re.sub(r"\s+", " ", text)
    first = text.split(" ", 1)[0]
    if first and first[1:] == first[1:].lower() and not first.lower().startswith("x-ray"):
        text = text[0].lower() + text[1:]  # a sentence start, not an acronym
    return text


def _line_problem(text: str, seen: set[str]) -> str | None:
    if not text:
        return "empty"
    if text.endswith(":") or _PREAMBLE.match(text) or any(c in text for c in "{}<>|#\t"):
        return "malformed"
    if len(text) > MAX_CHARS or len(text.split()) > MAX_WORDS:
        return "overlong"
    if text.casefold() in seen:
        return "duplicate"
    return None


def parse_phrasings(text: str, n: int) -> tuple[list[str], Counter]:
    """Up to ``n`` clean phrasings from a model's answer, and the rejected lines by reason.

    Numbering, bullets, quotes and final full stops are stripped; blank lines are skipped;
    empty, malformed (preamble, markup), overlong and duplicate lines are rejected.
    """
    kept: list[str] = []
    rejected: Counter = Counter()
    seen: set[str] = set()
    for line in str(text).splitlines():
        if not line.strip() or len(kept) >= n:
            continue
        phrase = _clean_line(line)
        problem = _line_problem(phrase, seen)
        if problem:
            rejected[problem] += 1
            continue
        seen.add(phrase.casefold())
        kept.append(phrase)
    return kept, rejected


# ----------------------------------------------------------------------------- interface


class CaptionBackend:
    """Gives alternative phrasings of one attribute value."""

    name = "backend"

    def __init__(self) -> None:
        self.rejected: Counter = Counter()  # malformed lines per attribute
        self.calls = 0

    def phrasings(self, attribute: str, value: Any, n: int) -> list[str]:
        """Up to ``n`` distinct phrasings of ``attribute = value``."""
        raise NotImplementedError

    def request(self, attribute: str, value: Any, n: int) -> str:
        """The text that determines the answer (the prompt, for language models)."""
        return attribute_prompt(attribute, value, n)

    def params(self) -> dict[str, Any]:
        """Settings that change the answer (part of the cache key)."""
        return {}

    def cache_key(self, attribute: str, value: Any, n: int) -> str:
        """A hash of backend name, request and parameters."""
        blob = json.dumps({"backend": self.name, "request": self.request(attribute, value, n),
                           "params": self.params()}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class RuleBackend(CaptionBackend):
    """The hand-written phrase banks: offline and deterministic."""

    name = "rule"

    def phrasings(self, attribute: str, value: Any, n: int) -> list[str]:
        self.calls += 1
        return rule_phrasings(attribute, value)[: max(0, n)]

    def request(self, attribute: str, value: Any, n: int) -> str:
        return f"{attribute}={value_key(value)};n={n}"

    def params(self) -> dict[str, Any]:
        return {"version": RULES_VERSION}


class LLMBackend(CaptionBackend):
    """A backend that sends the attribute prompt to a language model and parses the lines."""

    def complete(self, prompt: str) -> str:
        """The model's raw answer to ``prompt``."""
        raise NotImplementedError

    def phrasings(self, attribute: str, value: Any, n: int) -> list[str]:
        self.calls += 1
        kept, rejected = parse_phrasings(self.complete(self.request(attribute, value, n)), n)
        self.rejected[attribute] += sum(rejected.values())
        return kept


# ----------------------------------------------------------------------------- Hugging Face


def _model_source(model: str) -> str:
    """A local folder for ``model``, or its Hub id when the Hub can be reached."""
    if Path(model).expanduser().is_dir():
        return str(Path(model).expanduser())
    from medvqa_lib.data.hub import hub_reachable, offline_mode

    cached = _cached_snapshot(model)
    if offline_mode() or not hub_reachable():
        if cached is not None:
            return cached
        why = ("offline mode is set (HF_HUB_OFFLINE)" if offline_mode()
               else "the Hugging Face Hub cannot be reached")
        raise HubUnavailableError(
            f"text-generation model {model!r} is not a local folder and {why}. Fix: download "
            "it where there is internet and pass the folder, or use backend='rule'"
        )
    return model


def _cached_snapshot(model: str) -> str | None:
    """The snapshot folder of ``model`` in the Hugging Face cache (main revision first)."""
    from medvqa_lib.data.hub import hub_cache_dir

    folder = hub_cache_dir() / f"models--{model.replace('/', '--')}"
    ref = folder / "refs" / "main"
    candidates = [folder / "snapshots" / ref.read_text().strip()] if ref.is_file() else []
    candidates += sorted((folder / "snapshots").glob("*")) if folder.is_dir() else []
    for snapshot in candidates:
        if (snapshot / "config.json").is_file():
            return str(snapshot)
    return None


class HFTextGenerationBackend(LLMBackend):
    """A causal language model run with ``transformers.pipeline("text-generation")``.

    The model is loaded on the first request; offline, a name that is neither a local folder
    nor in the Hugging Face cache raises :class:`HubUnavailableError` at once.
    """

    def __init__(self, model_name_or_path: str | os.PathLike, max_new_tokens: int = 160,
                 device: str = "cpu") -> None:
        super().__init__()
        self.model = str(model_name_or_path)
        self.max_new_tokens = int(max_new_tokens)
        self.device = device
        self._pipe: Any = None

    @property
    def name(self) -> str:  # type: ignore[override]
        local = Path(self.model).expanduser()
        return f"hf:{local.resolve() if local.is_dir() else self.model}"

    def params(self) -> dict[str, Any]:
        return {"max_new_tokens": self.max_new_tokens, "do_sample": False}

    def pipeline(self) -> Any:
        """The loaded ``text-generation`` pipeline."""
        if self._pipe is None:
            source = _model_source(self.model)  # fails fast before transformers is imported
            from transformers import pipeline

            self._pipe = pipeline("text-generation", model=source, device=self.device,
                                  trust_remote_code=False)
        return self._pipe

    def complete(self, prompt: str) -> str:
        pipe = self.pipeline()
        chat = getattr(pipe.tokenizer, "chat_template", None)
        inputs: Any = [{"role": "system", "content": load_prompt("transcap_system")},
                       {"role": "user", "content": prompt}] if chat else prompt
        out = pipe(inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
                   return_full_text=False)
        text = out[0]["generated_text"]
        if isinstance(text, list):  # a chat transcript: the last message is the answer
            text = text[-1].get("content", "") if text else ""
        return str(text)


# ----------------------------------------------------------------------------- OpenAI-compatible


class OpenAIChatBackend(LLMBackend):
    """An OpenAI-compatible chat endpoint (``POST <base_url>/chat/completions``).

    ``base_url`` is e.g. ``http://localhost:11434/v1`` (ollama) or ``http://host:8000/v1``
    (vLLM). Local servers need no ``api_key``; for a hosted API pass it explicitly (it is
    sent as a bearer token to ``base_url`` only). Every request gives up after ``timeout``
    seconds.
    """

    def __init__(self, base_url: str, model: str, api_key: str | None = None,
                 timeout: float = 30, temperature: float = 0.7, max_tokens: int = 256) -> None:
        super().__init__()
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key = api_key
        self.timeout = float(timeout)
        self.temperature = float(temperature)
        self.max_tokens = int(max_tokens)

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"openai-chat:{self.model}"

    @property
    def url(self) -> str:
        return f"{self.base_url}/chat/completions"

    def params(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "max_tokens": self.max_tokens}

    def _opener(self) -> urllib.request.OpenerDirector:
        host = urlparse(self.url).hostname or ""
        if host in {"localhost", "127.0.0.1", "::1"}:  # a proxy must not intercept a local server
            return urllib.request.build_opener(urllib.request.ProxyHandler({}))
        return urllib.request.build_opener()

    def _post(self, payload: dict[str, Any]) -> bytes:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, data=json.dumps(payload).encode("utf-8"),
                                     headers=headers, method="POST")
        try:
            with self._opener().open(req, timeout=self.timeout) as resp:
                return resp.read()
        except urllib.error.HTTPError as e:
            body = e.read()[:300].decode("utf-8", "replace")
            raise CaptionBackendError(
                f"{self.url} answered HTTP {e.code}: {body}. Check the model name "
                f"{self.model!r} (e.g. `ollama pull {self.model}`) and the API key"
            ) from e
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            if isinstance(reason, TimeoutError):
                reason = f"no answer within {self.timeout:g} s"
            raise CaptionBackendError(
                f"cannot reach the chat endpoint {self.url} ({reason}). Fix: start the server "
                "(e.g. `ollama serve`) or use backend='rule'"
            ) from e

    def complete(self, prompt: str) -> str:
        payload = {
            "model": self.model,
            "messages": [{"role": "system", "content": load_prompt("transcap_system")},
                         {"role": "user", "content": prompt}],
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "stream": False,
        }
        raw = self._post(payload)
        try:
            return str(json.loads(raw)["choices"][0]["message"]["content"] or "")
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise CaptionBackendError(
                f"unexpected answer from {self.url}: {raw[:200]!r} (not an OpenAI chat completion)"
            ) from e


# ----------------------------------------------------------------------------- cache


class CachedBackend(CaptionBackend):
    """Keeps another backend's phrasings as JSON files in ``cache_dir`` (atomic writes).

    The file name is :meth:`CaptionBackend.cache_key` of the wrapped backend; a hit returns
    the stored phrasings and restores their rejected-line count without calling the model.
    """

    def __init__(self, backend: CaptionBackend, cache_dir: str | os.PathLike) -> None:
        super().__init__()
        self.backend = backend
        self.cache_dir = Path(cache_dir)
        self.hits = 0

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.backend.name

    def request(self, attribute: str, value: Any, n: int) -> str:
        return self.backend.request(attribute, value, n)

    def params(self) -> dict[str, Any]:
        return self.backend.params()

    def _load(self, path: Path) -> dict[str, Any] | None:
        if not path.is_file():
            return None
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(entry.get("phrasings"), list):
                return entry
        except (ValueError, OSError, AttributeError):
            pass
        log.warning("ignoring unreadable cache entry %s", path)
        return None

    def phrasings(self, attribute: str, value: Any, n: int) -> list[str]:
        self.calls += 1
        path = self.cache_dir / f"{self.backend.cache_key(attribute, value, n)}.json"
        entry = self._load(path)
        if entry is not None:
            self.hits += 1
            self.rejected[attribute] += int(entry.get("rejected", 0))
            return [str(p) for p in entry["phrasings"]]
        before = self.backend.rejected[attribute]
        out = list(self.backend.phrasings(attribute, value, n))
        rejected = self.backend.rejected[attribute] - before
        self.rejected[attribute] += rejected
        from medvqa_lib.io import atomic_write_json  # imports torch: only when writing

        atomic_write_json(path, {"backend": self.backend.name, "attribute": attribute,
                                 "value": value_key(value), "n": n, "phrasings": out,
                                 "rejected": rejected})
        return out


BACKENDS = ("rule", "hf", "openai")


def make_backend(kind: str = "rule", *, cache_dir: str | os.PathLike | None = None,
                 **kwargs: Any) -> CaptionBackend:
    """``"rule"``, ``"hf"`` (``model_name_or_path=...``) or ``"openai"`` (``base_url=...,
    model=...``), wrapped in a :class:`CachedBackend` when ``cache_dir`` is given."""
    classes = {"rule": RuleBackend, "hf": HFTextGenerationBackend, "openai": OpenAIChatBackend}
    if kind not in classes:
        raise unknown_name("caption backend", kind, BACKENDS)
    backend = classes[kind](**kwargs)
    return CachedBackend(backend, cache_dir) if cache_dir is not None else backend


def resolve_backend(backend: CaptionBackend | str | None) -> CaptionBackend:
    """A backend object from ``None``/``"rule"`` or an existing backend."""
    if backend is None:
        return RuleBackend()
    if isinstance(backend, str):
        return make_backend(backend)
    return backend
