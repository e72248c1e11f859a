"""The LangChain and LlamaIndex adapters with the real packages: documents get the passage
convention, queries the query one (instruct template with a task), in-process and through a real
`e5kit serve`, sync and async, and inside each framework's own vector store."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from e5kit import E5
from server_helpers import KEY

pytest.importorskip("langchain_core", reason="[required] langchain-core is not installed")
pytest.importorskip("llama_index.core", reason="[required] llama-index-core is not installed")

from e5kit.integrations.langchain import E5Embeddings  # noqa: E402
from e5kit.integrations.llamaindex import E5Embedding  # noqa: E402

DOCS = ["gene study of cancer risk", "protein intake per day for women", "the summit of the mountain"]
QUERY = "how much protein should a female eat"
TASK = "Given a question, retrieve passages that answer it"


def _expected(path, task=None):
    m = E5(str(path))
    return m.encode_passages(DOCS), m.encode_queries([QUERY], task=task)[0]


@pytest.mark.parametrize("where", ["local", "server"])
def test_langchain_embeddings(where, tiny_bert, tiny_instruct, tiny_process):
    from langchain_core.vectorstores import InMemoryVectorStore

    for name, path, task in (("tiny", tiny_bert, None), ("inst", tiny_instruct, TASK)):
        docs, query = _expected(path, task)
        emb = (E5Embeddings(str(path), task=task) if where == "local" else
               E5Embeddings(base_url=tiny_process.url + "/v1", model=name, api_key=KEY, task=task, batch_size=2))
        np.testing.assert_allclose(emb.embed_documents(DOCS), docs, atol=1e-5)
        np.testing.assert_allclose(emb.embed_query(QUERY), query, atol=1e-5)
        np.testing.assert_allclose(asyncio.run(emb.aembed_documents(DOCS)), docs, atol=1e-5)
        np.testing.assert_allclose(asyncio.run(emb.aembed_query(QUERY)), query, atol=1e-5)
        assert emb.embed_documents([]) == []
        # inside LangChain's own store: the ranking is E5's query-vs-passage ranking
        store = InMemoryVectorStore.from_texts(DOCS, emb)
        hits = store.similarity_search(QUERY, k=3)
        assert [h.page_content for h in hits] == [DOCS[i] for i in np.argsort(-(docs @ query))]
    # the two conventions really differ (so the checks above are not vacuous)
    m = E5(str(tiny_bert))
    assert not np.allclose(m.encode_queries(DOCS), m.encode_passages(DOCS), atol=1e-3)


@pytest.mark.parametrize("where", ["local", "server"])
def test_llamaindex_embedding(where, tiny_bert, tiny_instruct, tiny_process):
    from llama_index.core import Document, VectorStoreIndex

    for name, path, task in (("tiny", tiny_bert, None), ("inst", tiny_instruct, TASK)):
        docs, query = _expected(path, task)
        emb = (E5Embedding(str(path), task=task) if where == "local" else
               E5Embedding(base_url=tiny_process.url, model=name, api_key=KEY, task=task, embed_batch_size=2))
        np.testing.assert_allclose(emb.get_text_embedding_batch(DOCS), docs, atol=1e-5)
        np.testing.assert_allclose(emb.get_text_embedding(DOCS[1]), docs[1], atol=1e-5)
        np.testing.assert_allclose(emb.get_query_embedding(QUERY), query, atol=1e-5)
        np.testing.assert_allclose(asyncio.run(emb.aget_query_embedding(QUERY)), query, atol=1e-5)
        np.testing.assert_allclose(asyncio.run(emb.aget_text_embedding_batch(DOCS)), docs, atol=1e-5)
        # inside a LlamaIndex index (no metadata, so each node's text is the document itself)
        index = VectorStoreIndex.from_documents([Document(text=d) for d in DOCS], embed_model=emb)
        hits = index.as_retriever(similarity_top_k=3).retrieve(QUERY)
        assert [h.node.get_content() for h in hits] == [DOCS[i] for i in np.argsort(-(docs @ query))]


def test_server_errors_surface_with_the_servers_message(tiny_process):
    emb = E5Embeddings(base_url=tiny_process.url, model="no-such-model", api_key=KEY)
    with pytest.raises(RuntimeError, match="answered 404: model 'no-such-model' is not served here"):
        emb.embed_query(QUERY)
    with pytest.raises(RuntimeError, match="answered 401"):
        E5Embeddings(base_url=tiny_process.url, model="tiny").embed_query(QUERY)
    with pytest.raises(TypeError, match="apply to a local model"):
        E5Embeddings(base_url=tiny_process.url, device="cpu")


def test_token_ids_from_another_tokenizer_are_refused(tiny_server, tiny_bert):
    """What LangChain's OpenAIEmbeddings sends by default: a client tokenizer's ids (tiktoken's,
    here ids without the model's [CLS]). Embedded as this vocabulary they would be silently wrong."""
    own = E5(str(tiny_bert)).tokenize(["passage: gene study"])[0]
    c, url, h = tiny_server.client, "/v1/embeddings", tiny_server.headers
    r = c.post(url, json={"input": [own, own[1:-1]], "model": "tiny"}, headers=h)
    assert r.status_code == 400 and r.json()["error"]["code"] == "foreign_token_ids"
    assert "item 1" in r.json()["error"]["message"] and "check_embedding_ctx_length" in r.json()["error"]["message"]
    # a foreign list that happens to start with the [CLS] id is caught by its end; so is [CLS] alone
    for foreign in (own[:1] + own[1:-1], own[:1]):
        r = c.post(url, json={"input": [own, foreign], "model": "tiny"}, headers=h)
        assert r.status_code == 400 and r.json()["error"]["code"] == "foreign_token_ids", r.text
    ok = c.post(url, json={"input": [own], "model": "tiny"}, headers=h)
    assert ok.status_code == 200 and len(ok.json()["data"]) == 1
