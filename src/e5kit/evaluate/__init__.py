"""Evaluation as the E5 authors ran it: BEIR retrieval, STS, classification, reports, MTEB adapter."""

from .data import DatasetError, load_beir, load_classification, load_sts
from .metrics import retrieval_scores
from .mteb_adapter import E5ForMTEB
from .tasks import TaskRun, evaluate_classification, evaluate_retrieval, evaluate_sts, mteb_undersample

__all__ = ["DatasetError", "load_beir", "load_sts", "load_classification", "retrieval_scores", "TaskRun",
           "evaluate_retrieval", "evaluate_sts", "evaluate_classification", "mteb_undersample", "E5ForMTEB"]
