"""The training loop: E5's contrastive recipe on one process or many (torchrun).

Each step takes a global batch of ``batch_size x world_size`` examples (a seeded permutation per
epoch, split in contiguous per-process slices), embeds queries and their candidate passages
(positive + hard negatives) with E5's prefixes, mean pooling and L2 normalisation, gathers the
passages from every process, and applies InfoNCE (+ KL distillation when teacher scores are
given). GradCache (``chunk_size``) bounds memory by the chunk instead of the batch. Gradients are
averaged over processes by hand after the backward (so GradCache's several backwards need no
DDP hooks); every process then takes the same AdamW step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import random
import resource
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from ..encoder import Encoder, embed_batch
from ..engine import resolve_device
from ..loading import load_checkpoint, load_encoder, load_tokenizer
from ..prompts import format_texts
from .checkpoint import save_model
from .data import Example, Schedule, load_examples, pick_negatives
from .gradcache import full_batch_step, grad_cache_step
from .config import TrainConfig
from .losses import LossOutput, contrastive_loss

log = logging.getLogger("e5kit.train")

STATE_FILE = "trainer_state.pt"
AMP_DTYPES = {"fp32": None, "float32": None, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
              "fp16": torch.float16, "float16": torch.float16}


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    history: list[dict] = field(default_factory=list)  # the metrics rows this process logged
    interrupted: bool = False  # stopped early by SIGINT/SIGTERM, with a checkpoint to resume from


# ---- distributed helpers --------------------------------------------------------------------

def _dist_setup(device_hint: str | None) -> tuple[int, int, bool]:
    """(rank, world, whether we initialised the process group). torchrun sets the env vars."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        use_cuda = torch.cuda.is_available() and (device_hint is None or str(device_hint).startswith("cuda"))
        dist.init_process_group("nccl" if use_cuda else "gloo")
        return dist.get_rank(), world, True
    return 0, 1, False


def _average_gradients(params: list[torch.nn.Parameter], world: int) -> None:
    if world == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])  # one collective instead of one per tensor
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world
    off = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[off:off + n].view_as(p.grad))
        off += n


def _mean_over_processes(values: list[float], world: int, device: torch.device) -> list[float]:
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)  # NCCL reduces CUDA tensors only
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return (t / world).tolist()


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


class _StopRequest:
    """SIGINT / SIGTERM ask the run to stop after the current step (with a checkpoint); a second
    signal falls through to the default behaviour."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self._old: dict = {}

    def _handle(self, signum, frame) -> None:
        self.requested = True
        self.uninstall()

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def uninstall(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}


# ---- RNG --------------------------------------------------------------------------------------

def _rng_state(device: torch.device) -> dict:
    st = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def _set_rng_state(st: dict, device: torch.device) -> None:
    random.setstate(st["python"])
    torch.set_rng_state(st["torch"])
    if device.type == "cuda" and "cuda" in st:
        torch.cuda.set_rng_state(st["cuda"], device)


# ---- the trainer --------------------------------------------------------------------------------

def _lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))
    return f


def _optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The highest-numbered ``checkpoint-N`` directory with a trainer state, or None."""
    best = None
    for d in Path(output_dir).glob("checkpoint-*"):
        if d.name.split("-")[-1].isdigit() and (d / STATE_FILE).exists():
            if best is None or int(d.name.split("-")[-1]) > int(best.name.split("-")[-1]):
                best = d
    return best


class Trainer:
    def __init__(self, cfg: TrainConfig):
        cfg.validate()
        self.cfg = cfg
        self.rank, self.world, self._owns_group = _dist_setup(cfg.device)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if cfg.device is None and torch.cuda.is_available():
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", self.rank)) % torch.cuda.device_count())
        else:
            self.device = resolve_device(cfg.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.amp_dtype = AMP_DTYPES[cfg.precision]
        if self.amp_dtype == torch.float16 and self.device.type != "cuda":
            raise ValueError("fp16 training needs CUDA; use bf16 or fp32 on CPU")
        self.output_dir = Path(cfg.output_dir)

        self.resume_dir: Path | None = None
        if cfg.resume:
            self.resume_dir = latest_checkpoint(self.output_dir) if cfg.resume == "auto" else Path(cfg.resume)
            if cfg.resume != "auto" and not (self.resume_dir / STATE_FILE).exists():
                raise FileNotFoundError(f"{self.resume_dir} holds no {STATE_FILE}; give a checkpoint-N directory")
            if self.resume_dir is None:
                log.info("no checkpoint-N in %s to resume from; starting a new run", self.output_dir)

        # data first: a file that does not parse stops the run before any model is loaded
        self.examples: list[Example] = load_examples(cfg.data, cfg.skip_bad_lines, cfg.negatives, cfg.distill)
        self.distill = self.examples[0].teacher_scores is not None
        self.eval_split = _check_eval_data(cfg)  # a bad eval folder or split stops the run before step 1
        # the base checkpoint gives config and tokenizer; a resumed run takes its weights from the checkpoint
        self.base = load_checkpoint(cfg.model, prompt_style=cfg.prompt_style)
        self.prompt_style = self.base.spec.prompt_style
        enc_cfg = self.base.config
        if cfg.dropout is not None:
            enc_cfg = dataclasses.replace(enc_cfg, hidden_dropout=cfg.dropout, attention_dropout=cfg.dropout)
        weights = self.resume_dir if self.resume_dir is not None else self.base.path
        self.model: Encoder = load_encoder(weights, enc_cfg).to(self.device).train()
        self.model.gradient_checkpointing = cfg.gradient_checkpointing
        if self.world > 1:  # identical start on every process, whatever each one loaded
            for p in self.model.parameters():
                dist.broadcast(p.data, 0)
        max_tok = self.base.spec.max_tokens
        self.q_tok = load_tokenizer(self.base.path, min(cfg.query_max_length, max_tok))
        self.p_tok = load_tokenizer(self.base.path, min(cfg.passage_max_length, max_tok))

        global_batch = cfg.batch_size * self.world
        self.schedule = Schedule(len(self.examples), global_batch, cfg.seed, cfg.shuffle)
        self.total_steps = cfg.max_steps or cfg.epochs * self.schedule.steps_per_epoch
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_ratio * self.total_steps)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = _optimizer(self.model, cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(warmup, self.total_steps))
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.step = 0
        torch.manual_seed(cfg.seed + self.rank)  # dropout masks differ per process, reproducibly
        random.seed(cfg.seed + self.rank)
        if self.resume_dir is not None:
            self._load_state(self.resume_dir)

    # ---- state ------------------------------------------------------------------------------

    def _load_state(self, d: Path) -> None:
        st = torch.load(d / STATE_FILE, map_location="cpu", weights_only=False)
        if st["world_size"] != self.world or st["batch_size"] != self.cfg.batch_size:
            raise ValueError(f"{d} was written by {st['world_size']} process(es) x batch {st['batch_size']}; "
                             f"resume with the same (now {self.world} x {self.cfg.batch_size}) to continue the same run")
        if st.get("optimizer") is not None:
            self.optimizer.load_state_dict(st["optimizer"])
        else:
            log.warning("%s holds no optimizer state (saved with save_optimizer: false): AdamW restarts its "
                        "moment estimates, so the run continues close to, not exactly like, an uninterrupted one", d)
        self.scheduler.load_state_dict(st["scheduler"])
        if self.scaler is not None and st.get("scaler"):
            self.scaler.load_state_dict(st["scaler"])
        self.step = st["step"]
        rng = d / f"rng_state_{self.rank}.pt"
        if rng.exists():
            _set_rng_state(torch.load(rng, map_location="cpu", weights_only=False), self.device)
        log.info("resumed from %s at step %d", d, self.step)

    def save(self, out: Path, with_state: bool = True) -> Path:
        """Model files (rank 0) and, for step checkpoints, the state to resume from."""
        if self.rank == 0:
            save_model(self.model, self.base.path, out, self.prompt_style, self.cfg.model, self.base.spec.max_tokens)
            if with_state:
                optim = self.optimizer.state_dict() if self.cfg.save_optimizer else None
                torch.save({"step": self.step, "optimizer": optim,
                            "scheduler": self.scheduler.state_dict(),
                            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                            "world_size": self.world, "batch_size": self.cfg.batch_size,
                            "config": dataclasses.asdict(self.cfg)}, out / STATE_FILE)
        _barrier(self.world)
        if with_state:
            torch.save(_rng_state(self.device), out / f"rng_state_{self.rank}.pt")
        _barrier(self.world)
        return out

    def _rotate(self) -> None:
        limit = self.cfg.save_total_limit
        if self.rank != 0 or not limit:
            return
        ckpts = sorted((d for d in self.output_dir.glob("checkpoint-*") if d.name.split("-")[-1].isdigit()),
                       key=lambda d: int(d.name.split("-")[-1]))
        for d in ckpts[:-limit]:
            shutil.rmtree(d, ignore_errors=True)

    # ---- one step ---------------------------------------------------------------------------

    def _batch(self, step: int) -> tuple[list[list[int]], list[list[int]], torch.Tensor | None]:
        cfg = self.cfg
        epoch, ids = self.schedule.batch(step, self.rank, self.world)
        queries, passages, scores = [], [], []
        for i in ids:
            ex = self.examples[i]
            rng = random.Random(f"{cfg.seed}/{epoch}/{i}")  # the example's negatives this epoch
            negs, sc = pick_negatives(ex, cfg.negatives, rng)
            queries.append(ex.query)
            passages += [ex.positive] + negs
            scores.append(sc)
        q = format_texts(queries, "query", self.prompt_style, cfg.task)
        p = format_texts(passages, "passage", self.prompt_style, cfg.task)
        q_ids = [e.ids for e in self.q_tok.encode_batch(q)]
        p_ids = [e.ids for e in self.p_tok.encode_batch(p)]
        teacher = torch.tensor(scores, dtype=torch.float32) if self.distill else None
        return q_ids, p_ids, teacher

    def _encode(self, seqs: list[list[int]]) -> torch.Tensor:
        ctx = (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None
               else contextlib.nullcontext())
        with ctx:
            return embed_batch(self.model, seqs, self.device, normalize=True)

    def train_step(self) -> tuple[LossOutput, float]:
        cfg = self.cfg
        q_ids, p_ids, teacher = self._batch(self.step)
        B, group = len(q_ids), 1 + cfg.negatives
        if cfg.chunk_size:
            cs = cfg.chunk_size
            chunks = [q_ids[i:i + cs] for i in range(0, B, cs)] + [p_ids[i:i + cs] for i in range(0, len(p_ids), cs)]
        else:
            chunks = [q_ids, p_ids]

        def loss_fn(embs: torch.Tensor) -> LossOutput:
            return contrastive_loss(embs[:B], embs[B:], group, cfg.temperature, teacher, cfg.alpha,
                                    cfg.teacher_temperature, cfg.gather)

        if cfg.chunk_size:
            out = grad_cache_step(self._encode, chunks, loss_fn, self.device, self.scaler)
        else:
            out = full_batch_step(self._encode, chunks, loss_fn, self.scaler)
        _average_gradients(self.params, self.world)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm and cfg.max_grad_norm > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return out, grad_norm

    # ---- the loop ---------------------------------------------------------------------------

    def train(self) -> TrainResult:
        cfg = self.cfg
        main = self.rank == 0
        history: list[dict] = []
        if main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
        # a resumed run appends to its log; a new run starts one
        mode = "a" if self.resume_dir is not None else "w"
        metrics_f = open(self.output_dir / "metrics.jsonl", mode, encoding="utf-8") if main else None
        tb = self._tensorboard() if main and cfg.tensorboard else None
        show = cfg.progress if cfg.progress is not None else sys.stderr.isatty()
        bar = None
        if main and show:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, unit="step", desc="training")
        if main:
            log.info("training %s on %d examples: %d steps of %d queries x %d candidates (%d process(es))%s",
                     cfg.model, len(self.examples), self.total_steps, cfg.batch_size * self.world, 1 + cfg.negatives,
                     self.world, f", GradCache chunks of {cfg.chunk_size}" if cfg.chunk_size else "")
        t_start = time.perf_counter()
        stop, interrupted = _StopRequest(), False
        try:
            stop.install()
            while self.step < self.total_steps:
                t0 = time.perf_counter()
                lr = self.scheduler.get_last_lr()[0]
                out, grad_norm = self.train_step()
                dt = time.perf_counter() - t0
                kl = float(out.kl) if out.kl is not None else 0.0
                loss, infonce, kl, acc, stop_requested = _mean_over_processes(
                    [out.loss.item(), out.infonce.item(), kl, out.accuracy, float(stop.requested)], self.world,
                    self.device)
                row = {"step": self.step, "epoch": (self.step - 1) // self.schedule.steps_per_epoch, "loss": loss,
                       "infonce": infonce, "accuracy": acc, "lr": lr, "grad_norm": grad_norm,
                       "examples_per_s": cfg.batch_size * self.world / dt, "step_s": dt,
                       "elapsed_s": time.perf_counter() - t_start, "peak_memory_mb": _peak_memory_mb(self.device)}
                if self.distill:
                    row["kl"] = kl
                history.append(row)
                if main and (self.step % max(1, cfg.log_every) == 0 or self.step == self.total_steps):
                    metrics_f.write(json.dumps(row) + "\n")
                    metrics_f.flush()
                    if tb is not None:
                        for k in ("loss", "infonce", "accuracy", "lr", "grad_norm", "examples_per_s"):
                            tb.add_scalar(f"train/{k}", row[k], self.step)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", ex_s=f"{row['examples_per_s']:.1f}")
                if cfg.eval_every and cfg.eval_data and self.step % cfg.eval_every == 0:
                    self._evaluate(metrics_f, tb)
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < self.total_steps:
                    self.save(self.output_dir / f"checkpoint-{self.step}")
                    self._rotate()
                if stop_requested > 0 and self.step < self.total_steps:  # every process sees it at the same step
                    ck = self.save(self.output_dir / f"checkpoint-{self.step}")
                    log.warning("stopped at step %d of %d; %s holds the run: continue it with --resume auto",
                                self.step, self.total_steps, ck)
                    interrupted = True
                    break
            if not interrupted:
                self.save(self.output_dir, with_state=False)
                if cfg.eval_data and (not cfg.eval_every or self.step % cfg.eval_every):  # final weights, unless just done
                    self._evaluate(metrics_f, tb)
        except Exception:
            self._save_on_failure()
            raise
        finally:
            stop.uninstall()
            if bar is not None:
                bar.close()
            if metrics_f is not None:
                metrics_f.close()
            if tb is not None:
                tb.close()
            if self._owns_group:
                dist.destroy_process_group()
        return TrainResult(self.output_dir, self.step, history, interrupted)

    def _save_on_failure(self) -> None:
        """Keep what was trained when a step or an evaluation fails (one process: with several, the
        others may be stuck in a collective, so only the last regular checkpoint is there)."""
        if self.step == 0 or self.world > 1:
            return
        try:
            ck = self.save(self.output_dir / f"checkpoint-{self.step}")
        except Exception as e:  # the original error matters more
            log.error("could not save the run after the failure: %s", e)
            return
        log.error("the run failed at step %d; %s holds the weights and state so far (continue with --resume auto)",
                  self.step, ck)

    def _tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.warning("tensorboard is not installed (pip install tensorboard); logging to metrics.jsonl only")
            return None
        return SummaryWriter(str(self.output_dir / "tensorboard"))

    def _evaluate(self, metrics_f, tb) -> dict | None:
        """nDCG@10 etc. on the BEIR dev set through ``e5kit.evaluate``, when that module exists."""
        if self.rank != 0:
            _barrier(self.world)
            return None
        scores = None
        try:
            scores = evaluate_model(self.model, self.base, self.cfg, self.eval_split)
        finally:
            self.model.train()
        if scores is not None:
            row = {"step": self.step, **{f"eval/{k}": v for k, v in scores.items()}}
            metrics_f.write(json.dumps(row) + "\n")
            metrics_f.flush()
            if tb is not None:
                for k, v in scores.items():
                    tb.add_scalar(f"eval/{k}", v, self.step)
            log.info("step %d eval: %s", self.step, scores)
        _barrier(self.world)
        return scores


_warned_no_eval = False


def _default_split(folder: str) -> str:
    return "dev" if (Path(folder) / "qrels" / "dev.tsv").exists() else "test"


def _check_eval_data(cfg: TrainConfig) -> str | None:
    """The split evaluated during training, after checking the BEIR folder loads (errors name the
    option to change); None when there is no evaluation."""
    if not cfg.eval_data:
        if cfg.eval_every:
            raise ValueError("--eval-every needs --eval-data (a BEIR folder)")
        return None
    split = cfg.eval_split or _default_split(cfg.eval_data)
    try:
        from ..evaluate.data import DatasetError, load_beir
    except ImportError:
        return split  # evaluate_model warns once and training goes on
    try:
        load_beir(cfg.eval_data, split)
    except DatasetError as e:
        raise ValueError(f"--eval-data {cfg.eval_data} --eval-split {split}: {e}") from None
    if not cfg.eval_every:
        log.info("evaluating %s (%s) on the final weights only (--eval-every N for every N steps)", cfg.eval_data, split)
    return split


def evaluate_model(model: Encoder, base, cfg: TrainConfig, split: str | None = None) -> dict[str, float] | None:
    """Retrieval scores of the model in training on cfg.eval_data (a BEIR folder) through
    ``e5kit.evaluate.evaluate_retrieval``; None (with one warning) when that module is absent."""
    global _warned_no_eval
    try:
        from ..evaluate import evaluate_retrieval  # optional: the evaluation extra
    except ImportError as e:
        if not _warned_no_eval:
            log.warning("skipping evaluation: e5kit.evaluate is not available (%s)", e)
            _warned_no_eval = True
        return None
    from ..api import E5
    from ..engine import Engine

    device = model.embeddings.word.weight.device
    e5 = E5.from_engine(Engine(base, device=device, dtype=torch.float32, encoder=model))
    with torch.no_grad():
        result = evaluate_retrieval(e5, cfg.eval_data, split=split or _default_split(cfg.eval_data))
    scores = getattr(result, "scores", result)
    out = {k: float(v) for k, v in dict(scores).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if hasattr(result, "main_score"):
        out["main_score"] = float(result.main_score)
    return out


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def train(cfg: TrainConfig) -> TrainResult:
    """Run (or resume) a training run; returns the output directory and the logged metrics."""
    return Trainer(cfg).train()


__all__ = ["TrainConfig", "TrainResult", "Trainer", "train", "latest_checkpoint", "evaluate_model"]
