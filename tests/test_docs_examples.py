"""The documented examples run: README's Python example and commands, docs/train.md's mining
command, its YAML config (as documented, with only paths and the run's size shrunk) and the three
ways it says to load the result, docs/search.md's Index and long-text examples, and docs/server.md's
Python (create_app with a KeyStore, the openai client, the LangChain / LlamaIndex adapters) against
that app on a real port; on the real multilingual-e5-small and a small SciFact slice."""

from __future__ import annotations

import contextlib
import io
import json
import re
import socket
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import run_e5kit

ROOT = Path(__file__).resolve().parents[1]
QUERY = "how much protein should a female eat"


def blocks(doc: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", (ROOT / doc).read_text(encoding="utf-8"), flags=re.S)


def run_snippet(code: str, doc: str, ns: dict | None = None) -> tuple[dict, str]:
    """Execute a documented snippet; its namespace and what it printed."""
    ns = {} if ns is None else ns
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, doc, "exec"), ns)
    return ns, out.getvalue()


@pytest.fixture(scope="module")
def model(ml_e5):
    """One loaded copy for the docs' snippets: they name `E5("intfloat/...")`, which becomes this object."""
    from e5kit import E5

    return E5(str(ml_e5))


def with_model(code: str) -> str:
    return re.sub(r'E5\("intfloat/[^"]+"\)', "MODEL", code)


def e5kit(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    r = run_e5kit(*args, env={"HF_HUB_OFFLINE": "1"}, cwd=cwd, timeout=600)
    assert r.returncode == 0 and "Traceback" not in r.stderr, f"e5kit {' '.join(args)}:\n{r.stderr[-3000:]}"
    return r


def small_scifact(src: Path, out: Path, n_train: int = 6, n_test: int = 4, n_extra: int = 12) -> Path:
    """A BEIR folder with a few train and test queries, their documents and some others."""
    def qrels(split):
        rows = [ln.split("\t") for ln in (src / "qrels" / f"{split}.tsv").read_text().splitlines()[1:]]
        keep = list(dict.fromkeys(r[0] for r in rows))[: n_train if split == "train" else n_test]
        return [r for r in rows if r[0] in keep]

    splits = {s: qrels(s) for s in ("train", "test")}
    corpus = [json.loads(ln) for ln in (src / "corpus.jsonl").read_text().splitlines()]
    wanted = {r[1] for rows in splits.values() for r in rows}
    docs = [d for d in corpus if d["_id"] in wanted] + [d for d in corpus if d["_id"] not in wanted][:n_extra]
    qids = {r[0] for rows in splits.values() for r in rows}
    queries = [ln for ln in (src / "queries.jsonl").read_text().splitlines() if json.loads(ln)["_id"] in qids]
    (out / "qrels").mkdir(parents=True)
    (out / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (out / "queries.jsonl").write_text("\n".join(queries) + "\n")
    for s, rows in splits.items():
        (out / "qrels" / f"{s}.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join("\t".join(r) + "\n" for r in rows))
    return out


def test_readme_python_example(ml_e5):
    code = blocks("README.md", "python")[0].replace('"intfloat/e5-small-v2"', repr(str(ml_e5)))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    scores = np.array([[float(x) for x in row.strip(" []").split()] for row in out.getvalue().strip().splitlines()])
    assert scores.shape == (2, 2) and (scores.argmax(1) == [0, 1]).all()  # "each query scores its own passage highest"
    assert 70 < scores.min() and scores.max() <= 100


@pytest.mark.slow
def test_readme_commands(ml_e5, tmp_path):
    cmds = [c for b in blocks("README.md", "bash") for c in b.splitlines() if c.startswith(("e5kit models", "e5kit info",
                                                                                            "e5kit embed"))]
    assert len(cmds) == 4, cmds
    (tmp_path / "docs.jsonl").write_text(json.dumps({"_id": "1", "text": "the highest point of a mountain"}) + "\n")
    for c in cmds:
        args = c.split("#")[0].split()[1:]
        args = [str(ml_e5) if a == "intfloat/multilingual-e5-small" else a for a in args]
        if args[0] == "embed":
            args += ["-m", str(ml_e5)]
        r = e5kit(*[a.strip('"') for a in args if a != '"summit'], *(["summit define"] if '"summit' in args else []),
                  cwd=tmp_path)
        assert r.stdout or (tmp_path / "docs.npy").exists()
    assert np.load(tmp_path / "docs.npy").shape == (1, 384)


@pytest.mark.slow
def test_train_doc_mine_config_and_loading(ml_e5, scifact, tmp_path):
    """docs/train.md: `e5kit mine --beir ...`, then `e5kit train run.yaml --max-steps N` with the
    documented run.yaml (bf16 + GradCache on CPU included), then the three documented loaders."""
    beir = small_scifact(scifact, tmp_path / "scifact")
    lines = [ln for b in blocks("docs/train.md", "bash") for ln in b.replace("\\\n", " ").splitlines()]
    args = next(ln for ln in lines if ln.startswith("e5kit mine --beir")).split()[1:]
    args = [str(ml_e5) if a == "intfloat/multilingual-e5-small" else str(beir) if a == "scifact/" else a for a in args]
    e5kit(*args, cwd=tmp_path)  # writes mined.jsonl
    rows = [json.loads(x) for x in (tmp_path / "mined.jsonl").read_text().splitlines()]
    assert rows and all(len(r["negatives"]) == 7 for r in rows)
    (tmp_path / "train.jsonl").write_text((tmp_path / "mined.jsonl").read_text())

    import yaml

    cfg = yaml.safe_load(blocks("docs/train.md", "yaml")[0])
    assert cfg["precision"] == "bf16" and cfg["chunk_size"] == 32  # the combination that used to crash on CPU
    cfg |= {"model": str(ml_e5), "eval_data": str(beir)}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    # the run's size only: 2 steps of 4 queries (x 2 candidates) in GradCache chunks of 3, short passages
    r = e5kit("train", "run.yaml", "--max-steps", "2", "--batch-size", "4", "--chunk-size", "3",
              "--passage-max-length", "48", cwd=tmp_path)
    assert "trained 2 steps" in r.stderr
    out = tmp_path / "my-e5"
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2] and all(np.isfinite(m["loss"]) for m in metrics if "loss" in m)
    assert any("eval/main_score" in m for m in metrics)  # evaluated on the final weights (split: test)

    loaders = next(b for b in blocks("docs/train.md", "python") if "AutoModel" in b)
    code = loaders.replace('"my-e5"', repr(str(out))).replace('["..."]', '["how much protein should a female eat"]')
    ns: dict = {}
    exec(compile(code, "docs/train.md", "exec"), ns)
    from e5kit import E5
    from sentence_transformers import SentenceTransformer

    q = ["how much protein should a female eat"]
    st = SentenceTransformer(str(out), device="cpu")
    np.testing.assert_allclose(st.encode_query(q), E5(str(out)).encode_queries(q), atol=1e-5)


def test_search_doc_index_and_long_text(model, scifact, tmp_path, monkeypatch):
    """docs/search.md: the Index example (add, search, delete, upsert, save, load) and the long-text one."""
    monkeypatch.chdir(tmp_path)
    basic, long_text_example = blocks("docs/search.md", "python")[:2]
    ns, printed = run_snippet(with_model(basic), "docs/search.md", {"MODEL": model})
    rows = [ln.split(" ", 2) for ln in printed.strip().splitlines()]
    assert [r[0] for r in rows] == ["d1", "d2"] and rows[0][2] == "{'url': 'https://a'}" and rows[1][2] == "None"
    hits = ns["index"].search(QUERY, k=5)  # the loaded index: d2 deleted, d1 replaced
    assert [h.id for h in hits] == ["d1"] and (tmp_path / "my-index").is_dir()
    expected = model.encode_queries([QUERY]) @ model.encode_passages(["A new version of passage one"]).T
    assert hits[0].score == pytest.approx(float(expected[0, 0]), abs=1e-5)

    docs = [json.loads(ln) for ln in (scifact / "corpus.jsonl").read_text().splitlines()[:8]]
    long_text = " ".join(d["text"] for d in docs)  # several SciFact abstracts: over 512 tokens
    given = {"MODEL": model, "long_text": long_text, "texts": [long_text, docs[0]["text"][:200]], "ids": ["long", "short"],
             "titles": ["Eight abstracts", docs[0]["title"]], "meta": [{"n": 8}, None]}
    ns, printed = run_snippet(with_model(long_text_example), "docs/search.md", given)
    assert len(ns["chunks"]) >= 2 and all(long_text[c.span[0]:c.span[1]] == c.text for c in ns["chunks"])
    assert ns["per_doc"].shape == (2, 384) and np.allclose(np.linalg.norm(ns["per_doc"], axis=1), 1, atol=1e-5)
    assert len(ns["per_chunk"].vectors) == len(ns["per_chunk"].doc) > 2
    assert sorted(ln.split()[0] for ln in printed.strip().splitlines()) == ["long", "short"]


class Serving:
    """An app on a real port of 127.0.0.1 (uvicorn in a thread of this process; the lifespan runs)."""

    def __init__(self, app):
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the app did not start"
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


def test_server_doc_python(model, tmp_path, monkeypatch):
    """docs/server.md: create_app with a KeyStore from keys.txt, served; then the openai client, the
    input_type example and the LangChain / LlamaIndex adapters against it, with the key the docs use."""
    import openai
    from llama_index.core import Settings

    monkeypatch.chdir(tmp_path)
    key = "sk-docs-0123456789"
    (tmp_path / "keys.txt").write_text(f"docs {key}\n")
    monkeypatch.setenv("E5KIT_API_KEY", key)
    client_example, adapters, input_type, from_python = blocks("docs/server.md", "python")[:4]
    app = run_snippet(with_model(from_python), "docs/server.md", {"MODEL": model})[0]["app"]
    docs = ["The summit is the highest point of a mountain.", "Women need about 46 grams of protein per day."]
    saved = Settings._embed_model
    try:
        with Serving(app) as url:
            code = client_example.replace("http://127.0.0.1:8000", url).replace('model="intfloat/e5-small-v2"', 'model="small"')
            ns, printed = run_snippet(code, "docs/server.md")
            assert len(ns["vec"]) == 384 and np.allclose(ns["vec"], model.encode_queries([QUERY])[0], atol=1e-5)
            assert int(printed) == len(model.tokenizer.encode("query: " + QUERY).ids)
            ns["docs"] = docs
            resp = eval(compile(input_type.strip(), "docs/server.md", "eval"), ns)
            np.testing.assert_allclose([d.embedding for d in resp.data], model.encode_passages(docs), atol=1e-5)
            with pytest.raises(openai.AuthenticationError):  # the keys.txt KeyStore is in force
                ns["client"].with_options(api_key="sk-wrong").embeddings.create(model="small", input="x")

            code = "import os\n" + adapters.replace('"http://127.0.0.1:8000", model="small")',
                                                     f'{url!r}, model="small", api_key=os.environ["E5KIT_API_KEY"])')
            assert code.count("api_key=") == 2
            ns = run_snippet(code, "docs/server.md")[0]
            np.testing.assert_allclose(ns["emb"].embed_query(QUERY), model.encode_queries([QUERY])[0], atol=1e-5)
            np.testing.assert_allclose(ns["emb"].embed_documents(docs), model.encode_passages(docs), atol=1e-5)
            np.testing.assert_allclose(Settings.embed_model.get_text_embedding(docs[1]), model.encode_passages(docs)[1],
                                       atol=1e-5)
    finally:
        Settings._embed_model = saved
