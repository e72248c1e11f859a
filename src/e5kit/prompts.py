"""The E5 input conventions, in one place.

* ``e5`` (E5, E5-v2, multilingual E5, the unsupervised models): ``query: `` on queries and
  ``passage: `` on documents; symmetric tasks put ``query: `` on both sides.
* ``instruct`` (multilingual-e5-large-instruct): ``Instruct: {task}\\nQuery: {text}`` on queries,
  nothing on documents.
* ``none``: text is used as given (a fine-tune trained without prefixes).

A text that already carries the prefix is never prefixed twice.
"""

from __future__ import annotations

from typing import Iterable, Literal

PROMPT_STYLES = ("e5", "instruct", "none")
InputType = Literal["query", "passage", "raw"]

QUERY_PREFIX = "query: "
PASSAGE_PREFIX = "passage: "
DEFAULT_TASK = "Given a web search query, retrieve relevant passages that answer the query"

# Task instructions the E5 authors used for MTEB / BEIR with their instruct models.
TASK_INSTRUCTIONS: dict[str, str] = {
    # retrieval (BEIR)
    "ArguAna": "Given a claim, find documents that refute the claim",
    "ClimateFEVER": "Given a claim about climate change, retrieve documents that support or refute the claim",
    "CQADupstackRetrieval": "Given a question, retrieve detailed question descriptions from Stackexchange that are duplicates to the given question",
    "DBPedia": "Given a query, retrieve relevant entity descriptions from DBPedia",
    "FEVER": "Given a claim, retrieve documents that support or refute the claim",
    "FiQA2018": "Given a financial question, retrieve user replies that best answer the question",
    "HotpotQA": "Given a multi-hop question, retrieve documents that can help answer the question",
    "MSMARCO": "Given a web search query, retrieve relevant passages that answer the query",
    "NFCorpus": "Given a question, retrieve relevant documents that best answer the question",
    "NQ": "Given a question, retrieve Wikipedia passages that answer the question",
    "QuoraRetrieval": "Given a question, retrieve questions that are semantically equivalent to the given question",
    "SCIDOCS": "Given a scientific paper title, retrieve paper abstracts that are cited by the given paper",
    "SciFact": "Given a scientific claim, retrieve documents that support or refute the claim",
    "Touche2020": "Given a question, retrieve detailed and persuasive arguments that answer the question",
    "TRECCOVID": "Given a query on COVID-19, retrieve documents that answer the query",
    # reranking
    "AskUbuntuDupQuestions": "Retrieve duplicate questions from AskUbuntu forum",
    "MindSmallReranking": "Retrieve relevant news articles based on user browsing history",
    "SciDocsRR": "Given a title of a scientific paper, retrieve the titles of other relevant papers",
    "StackOverflowDupQuestions": "Retrieve duplicate questions from StackOverflow forum",
    # pair classification
    "SprintDuplicateQuestions": "Retrieve duplicate questions from Sprint forum",
    "TwitterSemEval2015": "Retrieve tweets that are semantically similar to the given tweet",
    "TwitterURLCorpus": "Retrieve tweets that are semantically similar to the given tweet",
    # STS
    "STS12": "Retrieve semantically similar text.",
    "STS13": "Retrieve semantically similar text.",
    "STS14": "Retrieve semantically similar text.",
    "STS15": "Retrieve semantically similar text.",
    "STS16": "Retrieve semantically similar text.",
    "STS17": "Retrieve semantically similar text.",
    "STS22": "Retrieve semantically similar text.",
    "STSBenchmark": "Retrieve semantically similar text.",
    "BIOSSES": "Retrieve semantically similar text.",
    "SICK-R": "Retrieve semantically similar text.",
    "SummEval": "Given a news summary, retrieve other semantically similar summaries",
    # classification
    "AmazonCounterfactualClassification": "Classify a given Amazon customer review text as either counterfactual or not-counterfactual",
    "AmazonPolarityClassification": "Classify Amazon reviews into positive or negative sentiment",
    "AmazonReviewsClassification": "Classify the given Amazon review into its appropriate rating category",
    "Banking77Classification": "Given a online banking query, find the corresponding intents",
    "EmotionClassification": "Classify the emotion expressed in the given Twitter message into one of the six emotions: anger, fear, joy, love, sadness, and surprise",
    "ImdbClassification": "Classify the sentiment expressed in the given movie review text from the IMDB dataset",
    "MassiveIntentClassification": "Given a user utterance as query, find the user intents",
    "MassiveScenarioClassification": "Given a user utterance as query, find the user scenarios",
    "MTOPDomainClassification": "Classify the intent domain of the given utterance in task-oriented conversation",
    "MTOPIntentClassification": "Classify the intent of the given utterance in task-oriented conversation",
    "ToxicConversationsClassification": "Classify the given comments as either toxic or not toxic",
    "TweetSentimentExtractionClassification": "Classify the sentiment of a given tweet as either positive, negative, or neutral",
    # clustering
    "ArxivClusteringP2P": "Identify the main and secondary category of Arxiv papers based on the titles and abstracts",
    "ArxivClusteringS2S": "Identify the main and secondary category of Arxiv papers based on the titles",
    "BiorxivClusteringP2P": "Identify the main category of Biorxiv papers based on the titles and abstracts",
    "BiorxivClusteringS2S": "Identify the main category of Biorxiv papers based on the titles",
    "MedrxivClusteringP2P": "Identify the main category of Medrxiv papers based on the titles and abstracts",
    "MedrxivClusteringS2S": "Identify the main category of Medrxiv papers based on the titles",
    "RedditClustering": "Identify the topic or theme of Reddit posts based on the titles",
    "RedditClusteringP2P": "Identify the topic or theme of Reddit posts based on the titles and posts",
    "StackExchangeClustering": "Identify the topic or theme of StackExchange posts based on the titles",
    "StackExchangeClusteringP2P": "Identify the topic or theme of StackExchange posts based on the given paragraphs",
    "TwentyNewsgroupsClustering": "Identify the topic or theme of the given news articles",
}
_TASK_KEYS = {k.lower().replace("-", "").replace("_", ""): k for k in TASK_INSTRUCTIONS}


def task_instruction(task: str | None) -> str:
    """The instruction for ``task``: a known MTEB/BEIR task name (any case), else the text itself."""
    if task is None or not task.strip():
        return DEFAULT_TASK
    key = task.strip().lower().replace("-", "").replace("_", "")
    return TASK_INSTRUCTIONS.get(_TASK_KEYS.get(key, ""), task.strip())


def _check_style(style: str) -> None:
    if style not in PROMPT_STYLES:
        raise ValueError(f"unknown prompt style {style!r}; expected one of {PROMPT_STYLES}")


def format_text(text: str, input_type: InputType, style: str = "e5", task: str | None = None) -> str:
    """Apply the model's convention to one text (``raw`` returns it untouched)."""
    _check_style(style)
    if not isinstance(text, str):
        raise TypeError(f"expected a str, got {type(text).__name__}")
    if input_type == "raw" or style == "none":
        return text
    if input_type not in ("query", "passage"):
        raise ValueError(f"input_type must be 'query', 'passage' or 'raw', not {input_type!r}")
    if style == "e5":
        prefix = QUERY_PREFIX if input_type == "query" else PASSAGE_PREFIX
        return text if text.startswith(prefix) else prefix + text
    # instruct: queries carry the instruction, documents nothing.
    if input_type == "passage" or text.startswith("Instruct: "):
        return text
    return f"Instruct: {task_instruction(task)}\nQuery: {text}"


def format_texts(
    texts: Iterable[str], input_type: InputType, style: str = "e5", task: str | None = None
) -> list[str]:
    return [format_text(t, input_type, style, task) for t in texts]


def beir_document(title: str | None, text: str) -> str:
    """A BEIR document as the E5 authors embed it (before the ``passage: `` prefix)."""
    return f"{title or ''} {text}".strip()
