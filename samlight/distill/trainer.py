"""Dynamic Layer-wise Distillation: the encoder stage, then decoder alignment.

Resumable: every ``checkpoint_every`` steps the whole training state (weights, projections, optimiser,
stage and step) is written atomically to ``OUT/state/train_state.pt``. The data order and every random
prompt are functions of (seed, stage, step), so a run killed with ``kill -9`` and restarted continues
exactly where its last checkpoint was. Works under ``torchrun`` (DistributedDataParallel).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from samlight.checkpoints import load_student, save_student
from samlight.models import ModelSpec
from samlight.distill import distributed
from samlight.distill.config import FineTuneConfig
from samlight.distill.augment import apply_view, sample_view
from samlight.distill.data import PreparedImage, TrainingSample, masks_to_low_res, normalize, prepare_image
from samlight.distill.feature_cache import TeacherFeatureCache
from samlight.distill.loader import ThreadLoader
from samlight.distill.losses import dice_loss, mask_iou, relative_mse, sigmoid_focal_loss
from samlight.distill.metrics import MetricsLog, plot_metrics
from samlight.distill.prompts import random_prompts, sample_prompts
from samlight.distill.schedule import dynamic_layer_weights, layer_mapping
from samlight.distill.teacher import TeacherFeatures
from samlight.modeling import StudentConfig, build_student, seeded, student_config
from samlight.modeling.build import init_decoder_from
from samlight.modeling.sam_attention import fuse_rel_pos_attention

log = logging.getLogger(__name__)

STATE_DIR = "state"
STATE_FILE = "train_state.pt"
STUDENT_DIR = "student"
SNAPSHOT_DIR = "snapshots"
STAGES = ("encoder", "decoder")
STAGE_SEED = {"encoder": 1, "decoder": 2}
STUDENT_EMBEDDINGS_KEPT = 256
PREPARED_KEPT_BYTES = 1 << 30  # prepared images the data loader keeps in memory (3 MB each at 1024 px)


# --- helpers -------------------------------------------------------------------------------------


def learning_rate(base: float, step: int, total: int, warmup_fraction: float) -> float:
    """Linear warm-up, then cosine decay to a tenth of ``base``."""
    warmup = max(1, int(warmup_fraction * total))
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def sample_index(position: int, n: int, seed: int, stage: str, perms: dict) -> int:
    """Position in the endless stream of epochs -> sample index (a seeded permutation per epoch)."""
    epoch = position // n
    if epoch not in perms:
        perms[epoch] = np.random.default_rng([seed, STAGE_SEED[stage], epoch]).permutation(n)
    return int(perms[epoch][position % n])


def atomic_torch_save(obj, path: Path) -> None:
    temp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        torch.save(obj, temp)
        with open(temp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def _init_projections(projections: nn.ModuleList) -> None:
    for proj in projections:
        nn.init.xavier_uniform_(proj.weight)
        nn.init.zeros_(proj.bias)


class EncoderStage(nn.Module):
    """Student encoder plus the train-only projections from student blocks to their teacher blocks."""

    def __init__(self, encoder: nn.Module, student_dim: int, teacher_dim: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.projections = nn.ModuleList(nn.Linear(student_dim, teacher_dim) for _ in encoder.blocks)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        neck, blocks = self.encoder.forward_features(x)
        return neck, [proj(b) for proj, b in zip(self.projections, blocks)]


class DecoderStage(nn.Module):
    """The student's prompt path; encodes images itself when encoder blocks are being trained."""

    def __init__(self, sam: Sam) -> None:
        super().__init__()
        self.sam = sam

    def forward(self, images: torch.Tensor, prompts: list[dict],
                encode: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
        embeddings = self.sam.image_encoder(images) if encode else images
        return decode(self.sam, embeddings, prompts)


class _PromptGroup(NamedTuple):
    """One image's prompts of one kind, encoded."""

    image: int
    kind: str
    sparse: torch.Tensor
    dense: torch.Tensor


def decode(sam: Sam, embeddings: torch.Tensor, prompts: list[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Multimask logits and predicted IoUs per prompt group, in the order (image, then box before point) of
    ``prompts``. One decoder pass per prompt length for the whole batch (a box and a lone click are both two
    tokens, and share one): SAM's decoder called image by image and kind by kind is some 30 small passes per step,
    and the decoder's many small kernels, not its arithmetic, set the pace on a GPU."""
    by_length: dict[int, list[_PromptGroup]] = {}
    for kind in ("box", "point"):
        groups = [(i, p[kind]) for i, p in enumerate(prompts) if p[kind] is not None]
        if not groups:
            continue
        if kind == "box":
            boxes = torch.cat([g["boxes"] for _, g in groups])
            sparse, dense = sam.prompt_encoder(points=None, boxes=boxes, masks=None)
        else:
            points = (torch.cat([g["points"] for _, g in groups]), torch.cat([g["labels"] for _, g in groups]))
            sparse, dense = sam.prompt_encoder(points=points, boxes=None, masks=None)
        sizes = [len(g["boxes"] if kind == "box" else g["points"]) for _, g in groups]
        for (i, _), group_sparse, group_dense in zip(groups, sparse.split(sizes), dense.split(sizes)):
            by_length.setdefault(sparse.shape[1], []).append(_PromptGroup(i, kind, group_sparse, group_dense))
    pe = sam.prompt_encoder.get_dense_pe()
    results: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    for groups in by_length.values():
        sizes = [len(g.sparse) for g in groups]
        # each prompt's image embedding as views of the batch's, so no index tensor goes to the device (a copy
        # from the host waits for the GPU's queue to empty) and the gradients sum in a fixed order
        per_prompt = torch.cat([embeddings[g.image].expand(len(g.sparse), -1, -1, -1) for g in groups])
        low, iou = decode_per_prompt(sam.mask_decoder, per_prompt, pe, torch.cat([g.sparse for g in groups]),
                                     torch.cat([g.dense for g in groups]))
        results.update(zip([(g.image, g.kind) for g in groups], zip(low.split(sizes), iou.split(sizes))))
    return [results[key] for key in sorted(results, key=lambda key: (key[0], key[1] != "box"))]


def decode_per_prompt(decoder: nn.Module, embeddings: torch.Tensor, image_pe: torch.Tensor, sparse: torch.Tensor,
                      dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's ``MaskDecoder`` (multimask output) for K prompts that each bring their image's embedding (K, C, H, W):
    its ``predict_masks`` step for step, except that SAM repeats one image's embedding for all its prompts."""
    prompts = sparse.shape[0]
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    tokens = torch.cat((output_tokens.unsqueeze(0).expand(prompts, -1, -1), sparse), dim=1)
    src = embeddings + dense
    batch, channels, height, width = src.shape
    hs, src = decoder.transformer(src, image_pe.expand(prompts, -1, -1, -1), tokens)
    upscaled = decoder.output_upscaling(src.transpose(1, 2).reshape(batch, channels, height, width))
    hyper_in = torch.stack([mlp(hs[:, 1 + i]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], dim=1)
    b, c, h, w = upscaled.shape
    masks = (hyper_in @ upscaled.view(b, c, h * w)).view(b, -1, h, w)
    iou = decoder.iou_prediction_head(hs[:, 0])
    return masks[:, 1:], iou[:, 1:]


# --- data ----------------------------------------------------------------------------------------


class StageData:
    """Item ``position`` of a stage's endless stream: the prepared image, its cached teacher features
    (read here so data-loader workers do the disk reads) and, for the decoder stage, sampled prompts."""

    def __init__(self, samples: list[TrainingSample], stage: str, config: FineTuneConfig, img_size: int,
                 blocks: list[int], features: TeacherFeatures) -> None:
        self.samples = samples
        self.stage = stage
        self.config = config
        self.img_size = img_size
        self.blocks = blocks
        self.features = features
        self.perms: dict = {}
        self._kept: dict[int, tuple[PreparedImage, str]] = {}

    def __getitem__(self, position: int) -> dict:
        index = sample_index(position, len(self.samples), self.config.seed, self.stage, self.perms)
        sample = self.samples[index]
        prepared, key = self._prepared(index)
        item = {"pixels": prepared.pixels, "input_size": prepared.input_size, "key": key, "index": index, "view": None}
        if self.stage == "encoder" and self.config.augment > 0:
            rng = np.random.default_rng([self.config.seed, STAGE_SEED["encoder"], position, 11])
            if rng.random() < self.config.augment:  # a view of its own: features computed on the fly
                item["view"], item["key"] = sample_view(prepared.input_size, rng), None
        resident = self.features.is_resident(item["key"], self.blocks)
        item["features"] = None if resident else self.features.lookup(item["key"], self.img_size, self.blocks)
        if self.stage == "decoder":
            item["prompts"] = self._prompts(sample, prepared, position)
        return item

    def _prepared(self, index: int) -> tuple[PreparedImage, str]:
        """An image resized and padded for the model, and its content key; the first PREPARED_KEPT_BYTES of them are
        kept (later epochs then neither decode nor resize them)."""
        kept = self._kept.get(index)
        if kept is not None:
            return kept
        sample = self.samples[index]
        image = sample.load_image()
        kept = (prepare_image(image, self.img_size), sample.content_key(image))
        if (len(self._kept) + 1) * kept[0].pixels.numel() <= PREPARED_KEPT_BYTES:
            self._kept[index] = kept
        return kept

    def _prompts(self, sample: TrainingSample, prepared: PreparedImage, position: int) -> dict:
        rng = np.random.default_rng([self.config.seed, STAGE_SEED["decoder"], position, 7])
        masks = sample.load_masks()
        size = prepared.original_size
        sampled = sample_prompts(masks, size, rng, self.config.instances_per_image, self.config.box_fraction,
                                 self.config.box_jitter, boxes_without_masks=None if masks else sample.boxes)
        transform = ResizeLongestSide(self.img_size)
        low_res = 4 * (self.img_size // 16)
        targets = masks_to_low_res(masks, prepared.input_size, low_res, self.img_size)
        empty = torch.zeros(1, low_res, low_res)

        def gt(indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
            has = torch.as_tensor(indices >= 0)
            rows = [targets[i] if i >= 0 else empty[0] for i in indices]
            return (torch.stack(rows) if rows else empty[:0]), has

        out: dict = {"box": None, "point": None}
        if len(sampled.boxes):
            target, has = gt(sampled.box_gt)
            out["box"] = {"boxes": torch.as_tensor(transform.apply_boxes(sampled.boxes, size), dtype=torch.float32),
                          "target": target, "has_gt": has, "pixel_boxes": sampled.boxes}
        if len(sampled.points):
            target, has = gt(sampled.point_gt)
            points = transform.apply_coords(sampled.points, size)
            out["point"] = {"points": torch.as_tensor(points, dtype=torch.float32),
                            "labels": torch.as_tensor(sampled.labels, dtype=torch.int64),
                            "target": target, "has_gt": has}
        return out


def stage_loader(data: StageData, positions: list[int], batch_size: int, num_workers: int):
    return iter(ThreadLoader(data.__getitem__, positions, batch_size, num_workers))


def rank_positions(start_step: int, total_steps: int, config: FineTuneConfig, env) -> list[int]:
    """Stream positions this process reads for steps start..total (micro-batches in order)."""
    per_micro = config.batch_size * env.world_size
    positions = []
    for step in range(start_step, total_steps):
        for micro in range(config.grad_accum):
            base = (step * config.grad_accum + micro) * per_micro + env.rank * config.batch_size
            positions.extend(range(base, base + config.batch_size))
    return positions


# --- the run -------------------------------------------------------------------------------------


class Run:
    def __init__(self, student, teacher_spec: str | ModelSpec, samples: list[TrainingSample],
                 config: FineTuneConfig, teacher: Sam | None = None) -> None:
        config.validate()
        if not samples:
            raise ValueError("no training samples")
        self.config = config
        self.samples = samples if config.max_images is None else samples[: config.max_images]
        self.spec = teacher_spec if isinstance(teacher_spec, ModelSpec) else ModelSpec.parse(teacher_spec)
        self.identity = self.spec.identity
        self.env = distributed.setup(config.device)
        self.device = self.env.device
        self.autocast = self.device.type == "cuda" if config.autocast is None else config.autocast
        self.out = Path(config.out_dir)
        self.state_path = self.out / STATE_DIR / STATE_FILE
        self.metrics = MetricsLog(self.out / "metrics.jsonl")
        self._teacher = teacher
        self.student_spec = student

    # precision and teacher

    def precision(self):
        if self.autocast:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @property
    def teacher(self) -> Sam:
        if self._teacher is None:
            log.info("loading teacher %s", self.identity)
            self._teacher = self.spec.load()
        return self._teacher

    def _resident_bytes(self) -> int:
        gb = self.config.resident_features_gb
        if gb is None:
            if self.device.type != "cuda":
                return 0
            return torch.cuda.get_device_properties(self.device).total_memory // 10
        return int(gb * (1 << 30))

    def _build_student(self) -> tuple[Sam, StudentConfig, str]:
        spec = self.student_spec
        if isinstance(spec, StudentConfig):
            config = spec
        elif Path(str(spec)).is_dir():
            checkpoint = load_student(spec)
            return checkpoint.model, checkpoint.config, f"{checkpoint.config.name}-{checkpoint.sha256[:12]}"
        else:
            config = student_config(str(spec))
        model = seeded(self.config.seed, build_student, config)
        init_decoder_from(model, self.teacher)
        return model, config, f"{config.name}:init-seed{self.config.seed}"

    # main

    def execute(self) -> Path:
        cfg, env = self.config, self.env
        torch.manual_seed(cfg.seed)

        student, student_cfg, origin = self._build_student()
        teacher_img = self.teacher.image_encoder.img_size
        if teacher_img != student_cfg.encoder.img_size:
            raise ValueError(f"teacher input {teacher_img} px != student input {student_cfg.encoder.img_size} px")
        teacher_depth = len(self.teacher.image_encoder.blocks)
        teacher_dim = self.teacher.image_encoder.patch_embed.proj.out_channels
        blocks = layer_mapping(student_cfg.encoder.depth, teacher_depth)
        stage_module = EncoderStage(student.image_encoder, student_cfg.encoder.embed_dim, teacher_dim)
        seeded(cfg.seed + 1, _init_projections, stage_module.projections)
        stage, step, optimizer_state = "encoder", 0, None
        state = self._load_state(student_cfg)
        if state is not None:
            if state["stage"] == "done" and (self.out / STUDENT_DIR).is_dir():
                return self.out / STUDENT_DIR
            student.load_state_dict(state["student"])
            stage_module.projections.load_state_dict(state["projections"])
            stage, step, optimizer_state = state["stage"], state["step"], state.get("optimizer")
            origin = state.get("origin", origin)
            log.info("resuming %s stage at step %d from %s", stage, step, self.state_path)
        if env.is_main:
            (self.out / STATE_DIR).mkdir(parents=True, exist_ok=True)
            for stale in (self.out / STATE_DIR).glob(".tmp-*"):  # a save cut short by a kill
                stale.unlink(missing_ok=True)
            if stage != "done":
                self.metrics.truncate_from(stage, step)
        env.barrier()
        cache = None
        if cfg.cache_dir is not None:
            cache = TeacherFeatureCache(cfg.cache_dir, self.identity, int(cfg.cache_max_gb * (1 << 30)))
        self.teacher.to(self.device).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        # its attention with the relative positions in one fused call: same values, no N x N score tensors
        fuse_rel_pos_attention(self.teacher.image_encoder)
        features = TeacherFeatures(self.spec, self.device, cache, self.autocast, teacher=self.teacher,
                                   identity=self.identity, resident_bytes=self._resident_bytes())
        student.to(self.device)
        stage_module.to(self.device)
        self._context = dict(student=student, student_cfg=student_cfg, origin=origin, stage_module=stage_module,
                             blocks=blocks, features=features, cache=cache)
        if stage == "encoder":
            self.encoder_stage(step, optimizer_state)
            stage, step, optimizer_state = "decoder", 0, None
        if stage == "decoder":
            self.decoder_stage(step, optimizer_state)
        path = self.out / STUDENT_DIR
        if env.is_main:
            records = self.metrics.read()
            summary = {s: next((r for r in reversed(records) if r["stage"] == s), None) for s in STAGES}
            metadata = {
                "teacher": self.identity,
                "student_origin": origin,
                "metrics": {s: r for s, r in summary.items() if r is not None},
                "distill": cfg.to_dict(),
                "images": len(self.samples),
                "layer_mapping": [b + 1 for b in blocks],
                "feature_cache": cache.stats() if cache is not None else None,
            }
            student.cpu()
            save_student(student, student_cfg, path, metadata)
            self._save_state("done", 0, None)
            plot_metrics(records, self.out / "plots")
        env.barrier()
        env.close()
        return path

    # state

    def _data_fingerprint(self) -> dict:
        """Which images the run trains on: their count and a hash of their identities, in order."""
        names = [s.key or (str(s.image) if isinstance(s.image, (str, os.PathLike)) else f"array{s.image.shape}")
                 for s in self.samples]
        return {"images": len(names), "sha256": hashlib.sha256("\n".join(names).encode()).hexdigest()}

    def _load_state(self, student_cfg: StudentConfig) -> dict | None:
        if not self.state_path.exists():
            return None
        if self.config.restart:
            log.info("--restart: starting over in %s", self.out)
            return None
        try:
            state = torch.load(self.state_path, map_location="cpu", weights_only=False)
        except Exception as error:
            raise ValueError(f"{self.state_path}: unreadable training state ({error}); "
                             "delete it to start over") from None
        if state.get("teacher") != self.identity:
            raise ValueError(f"{self.out} holds a run distilled from {state.get('teacher')}, not {self.identity}; "
                             "use another output directory")
        if state.get("student_config") != student_cfg.to_dict():
            raise ValueError(f"{self.out} holds a run of another student config; use another output directory")
        changes = self.config.changes_from(state.get("config") or {})
        data = state.get("data")
        if data is not None and data != self._data_fingerprint():
            changes.append(f"training images ({data['images']} → {len(self.samples)}, or others)")
        if changes and state["stage"] != "done":
            raise ValueError(f"{self.out} holds an unfinished run with other settings: {'; '.join(changes)}. Rerun "
                             "with its settings to resume it, or add --restart to start over in this directory")
        return state

    def _save_state(self, stage: str, step: int, optimizer) -> None:
        if not self.env.is_main:
            return
        ctx = self._context
        atomic_torch_save({
            "version": 1, "stage": stage, "step": step, "teacher": self.identity, "origin": ctx["origin"],
            "student_config": ctx["student_cfg"].to_dict(),
            "student": {k: v.detach().cpu() for k, v in ctx["student"].state_dict().items()},
            "projections": {k: v.detach().cpu() for k, v in ctx["stage_module"].projections.state_dict().items()},
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "config": self.config.to_dict(), "data": self._data_fingerprint(),
        }, self.state_path)

    def _wrap(self, module: nn.Module, find_unused: bool = False) -> nn.Module:
        if not self.env.distributed:
            return module
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=find_unused)

    def _progress(self, stage: str, start: int, total: int):
        return tqdm(total=total, initial=start, desc=f"distill {stage}", unit="step",
                    disable=not (self.config.progress and self.env.is_main), dynamic_ncols=True)

    # encoder stage

    def encoder_stage(self, start: int, optimizer_state) -> None:
        cfg, env, ctx = self.config, self.env, self._context
        total = cfg.encoder_steps
        if start >= total:
            return
        module = ctx["stage_module"]
        module.train()
        for p in module.parameters():
            p.requires_grad_(True)
        wrapped = self._wrap(module)
        optimizer = torch.optim.AdamW(module.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        if optimizer_state is not None:
            optimizer.load_state_dict(optimizer_state)
        img_size = ctx["student_cfg"].encoder.img_size
        blocks = ctx["blocks"]
        data = StageData(self.samples, "encoder", cfg, img_size, blocks, ctx["features"])
        loader = (stage_loader(data, rank_positions(start, total, cfg, env), cfg.batch_size, cfg.num_workers))
        features = ctx["features"]
        # the student's prompt path stays as it is (the output loss reaches the encoder through it)
        prompt_path = [*ctx["student"].prompt_encoder.parameters(), *ctx["student"].mask_decoder.parameters()]
        for p in prompt_path:
            p.requires_grad_(False)
        bar = self._progress("encoder", start, total)
        for step in range(start, total):
            began = time.perf_counter()
            weights = dynamic_layer_weights(step, total, len(blocks), cfg.layer_sigma)
            lr = learning_rate(cfg.lr, step, total, cfg.warmup_fraction)
            for group in optimizer.param_groups:
                group["lr"] = lr
            sums = {"loss": 0.0, "neck": 0.0, "output": 0.0, "layers": [0.0] * len(blocks)}
            hits = images = 0
            data_s = 0.0
            for micro in range(cfg.grad_accum):
                waited = time.perf_counter()
                items = next(loader)
                data_s += time.perf_counter() - waited
                x, sizes = self._encoder_inputs(items)
                t_neck, t_blocks = features.fetch([it["key"] for it in items], x, img_size, blocks,
                                                  [it["features"] for it in items])
                hits += sum(it["features"] is not None for it in items)
                images += len(items)
                sync = micro == cfg.grad_accum - 1 or not env.distributed
                with (contextlib.nullcontext() if sync else wrapped.no_sync()):
                    with self.precision():
                        s_neck, s_blocks = wrapped(x)
                    layer_losses = [relative_mse(s, t) for s, t in zip(s_blocks, t_blocks)]
                    neck_loss = relative_mse(s_neck, t_neck)
                    loss = sum(w * l for w, l in zip(weights, layer_losses)) + cfg.neck_weight * neck_loss
                    if cfg.output_weight:
                        output_loss = self._output_loss(s_neck, t_neck, sizes, step * cfg.grad_accum + micro)
                        loss = loss + cfg.output_weight * output_loss
                        sums["output"] += output_loss.item() / cfg.grad_accum
                    (loss / cfg.grad_accum).backward()
                sums["loss"] += loss.item() / cfg.grad_accum
                sums["neck"] += neck_loss.item() / cfg.grad_accum
                sums["layers"] = [a + l.item() / cfg.grad_accum for a, l in zip(sums["layers"], layer_losses)]
            grad_norm = torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - began
            record = {
                "stage": "encoder", "step": step, "loss": env.all_reduce_mean(sums["loss"]),
                "neck_loss": env.all_reduce_mean(sums["neck"]), "output_loss": env.all_reduce_mean(sums["output"]),
                "layer_losses": [env.all_reduce_mean(v) for v in sums["layers"]],
                "layer_weights": [round(w, 6) for w in weights], "lr": lr, "grad_norm": float(grad_norm),
                "images_per_s": images * env.world_size / elapsed, "cache_hits": hits * env.world_size,
                "images": images * env.world_size, "teacher_images": features.teacher_images,
                "data_wait_s": data_s, "time": time.time(),
            }
            if env.is_main:
                self.metrics.write(record)
            log.debug("encoder step %d: %s", step, record)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}", neck=f"{record['neck_loss']:.4f}",
                            w_deep=f"{weights[-1]:.2f}")
            if cfg.snapshot_every and (step + 1) % cfg.snapshot_every == 0 and env.is_main:
                self._snapshot(step + 1)
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == total:
                if step + 1 == total:
                    self._save_state("decoder", 0, None)
                else:
                    self._save_state("encoder", step + 1, optimizer)
        bar.close()
        for p in prompt_path:
            p.requires_grad_(True)

    def _encoder_inputs(self, items: list[dict]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Normalised model inputs of a batch, each augmented item replaced by its view (made on the device), and
        each input's image size."""
        pixels, sizes = [], []
        for it in items:
            p, size = it["pixels"].to(self.device, non_blocking=True), it["input_size"]
            if it["view"] is not None:
                p, size = apply_view(p, it["view"])
            pixels.append(p.float())
            sizes.append(size)
        return normalize(torch.stack(pixels), sizes), sizes

    def _output_loss(self, s_neck: torch.Tensor, t_neck: torch.Tensor, sizes: list[tuple[int, int]],
                     micro_step: int) -> torch.Tensor:
        """Relative MSE of the multimask logits the student's frozen decoder makes of its embedding to the teacher's
        of its own, under random prompts that are a function of (seed, micro-step, rank) like the data order."""
        # drawn on the training device: no copy from the host, which would wait for the GPU's queue to empty
        generator = torch.Generator(self.device).manual_seed(
            (self.config.seed * 1_000_003 + micro_step) * self.env.world_size + self.env.rank)
        prompts = random_prompts(sizes, self.config.output_prompts, generator)
        with self.precision():
            student = decode(self._context["student"], s_neck, prompts)
            with torch.no_grad():
                teacher = decode(self.teacher, t_neck, prompts)
        return relative_mse(torch.cat([low for low, _ in student]), torch.cat([low for low, _ in teacher]))

    def _snapshot(self, step: int) -> None:
        """The student as it is after ``step`` encoder steps: for fidelity-vs-steps curves."""
        ctx = self._context
        save_student(ctx["student"], ctx["student_cfg"], self.out / SNAPSHOT_DIR / f"encoder-{step:06d}",
                     {"teacher": self.identity, "encoder_step": step, "distill": self.config.to_dict()})

    # decoder stage

    def decoder_stage(self, start: int, optimizer_state) -> None:
        cfg, env, ctx = self.config, self.env, self._context
        total = cfg.decoder_steps
        if start >= total:
            return
        student: Sam = ctx["student"]
        encoder = student.image_encoder
        for p in student.parameters():
            p.requires_grad_(False)
        for p in student.mask_decoder.parameters():
            p.requires_grad_(True)
        n_blocks = len(encoder.blocks)
        unfreeze = n_blocks if cfg.unfreeze_blocks < 0 else min(cfg.unfreeze_blocks, n_blocks)
        if unfreeze:
            for block in list(encoder.blocks)[n_blocks - unfreeze:]:
                for p in block.parameters():
                    p.requires_grad_(True)
            for p in encoder.neck.parameters():
                p.requires_grad_(True)
        encode = unfreeze > 0
        student.train()
        module = DecoderStage(student)
        wrapped = self._wrap(module, find_unused=True)
        params = [p for p in student.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.decoder_lr, weight_decay=cfg.weight_decay)
        if optimizer_state is not None:
            optimizer.load_state_dict(optimizer_state)
        img_size = ctx["student_cfg"].encoder.img_size
        data = StageData(self.samples, "decoder", cfg, img_size, [], ctx["features"])
        loader = (stage_loader(data, rank_positions(start, total, cfg, env), cfg.batch_size, cfg.num_workers))
        features: TeacherFeatures = ctx["features"]
        teacher = self.teacher
        embeddings: dict[str, torch.Tensor] = {}  # frozen encoder: each image is embedded once
        bar = self._progress("decoder", start, total)
        for step in range(start, total):
            began = time.perf_counter()
            lr = learning_rate(cfg.decoder_lr, step, total, cfg.warmup_fraction)
            for group in optimizer.param_groups:
                group["lr"] = lr
            sums = {"loss": 0.0, "teacher_loss": 0.0, "gt_loss": 0.0, "iou_loss": 0.0, "gt_iou": 0.0,
                    "teacher_iou": 0.0}
            images = 0
            for micro in range(cfg.grad_accum):
                items = next(loader)
                images += len(items)
                keys = [it["key"] for it in items]
                pixels = torch.stack([it["pixels"] for it in items]).to(self.device, non_blocking=True)
                x = normalize(pixels, [it["input_size"] for it in items])
                t_neck, _ = features.fetch(keys, x, img_size, [], [it["features"] for it in items])
                prompts = [_to_device(it["prompts"], self.device) for it in items]
                if encode:
                    inputs = x
                else:
                    inputs = self._student_embeddings(encoder, keys, x, embeddings)
                sync = micro == cfg.grad_accum - 1 or not env.distributed
                with (contextlib.nullcontext() if sync else wrapped.no_sync()):
                    with self.precision():
                        outputs = wrapped(inputs, prompts, encode)
                        with torch.no_grad():
                            targets = decode(teacher, t_neck, prompts)
                    parts = self._decoder_losses(outputs, targets, prompts)
                    loss = (cfg.teacher_loss_weight * parts["teacher_loss"] + cfg.gt_loss_weight * parts["gt_loss"]
                            + cfg.iou_loss_weight * parts["iou_loss"])
                    (loss / cfg.grad_accum).backward()
                sums["loss"] += loss.item() / cfg.grad_accum
                for name in ("teacher_loss", "gt_loss", "iou_loss", "gt_iou", "teacher_iou"):
                    sums[name] += float(torch.as_tensor(parts[name]).detach()) / cfg.grad_accum
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - began
            record = {"stage": "decoder", "step": step, "lr": lr, "images_per_s": images * env.world_size / elapsed,
                      "unfrozen_blocks": unfreeze, "time": time.time()}
            record.update({k: env.all_reduce_mean(v) for k, v in sums.items()})
            if env.is_main:
                self.metrics.write(record)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}", teacher_iou=f"{record['teacher_iou']:.3f}",
                            gt_iou=f"{record['gt_iou']:.3f}")
            if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < total:
                self._save_state("decoder", step + 1, optimizer)
        bar.close()
        student.eval()
        for p in student.parameters():
            p.requires_grad_(True)

    @torch.no_grad()
    def _student_embeddings(self, encoder, keys: list[str], x: torch.Tensor, kept: dict) -> torch.Tensor:
        missing = [i for i, k in enumerate(keys) if k not in kept]
        if missing:
            encoder.eval()
            with self.precision():
                out = encoder(x[missing]).float()
            for row, i in enumerate(missing):
                if len(kept) >= STUDENT_EMBEDDINGS_KEPT:
                    kept.pop(next(iter(kept)))
                kept[keys[i]] = out[row]
        return torch.stack([kept[k] for k in keys])

    def _decoder_losses(self, outputs, targets, prompts) -> dict:
        cfg = self.config
        groups = [g for p in prompts for g in (p["box"], p["point"]) if g is not None]
        teacher_terms, gt_terms, iou_terms, gt_ious, teacher_ious = [], [], [], [], []
        for (low, iou), (t_low, t_iou), group in zip(outputs, targets, groups):
            low, iou = low.float(), iou.float()
            soft = torch.sigmoid(t_low.float())
            # the soft-target loss keeps the teacher's entropy (near log 2 where its logits are small): progress
            # shows in how many pixels the masks agree on
            teacher_ious.append(mask_iou(low.detach(), (t_low > 0).float()).flatten())
            # the teacher's masks and its IoU predictions (which pick the mask a click shows)
            teacher_terms.append(F.binary_cross_entropy_with_logits(low, soft, reduction="none").mean(dim=(1, 2, 3))
                                 + F.mse_loss(iou, t_iou.float(), reduction="none").mean(dim=1))
            has = group["has_gt"]
            if has.any():
                target = group["target"][has][:, None].expand_as(low[has])
                per_mask = cfg.focal_weight * sigmoid_focal_loss(low[has], target) + dice_loss(low[has], target)
                gt_terms.append(per_mask.min(dim=1).values)
                actual = mask_iou(low[has].detach(), target)
                iou_terms.append(F.mse_loss(iou[has], actual, reduction="none").mean(dim=1))
                gt_ious.append(actual.max(dim=1).values)
        zero = outputs[0][0].sum() * 0 if outputs else torch.zeros(())
        cat = lambda terms: torch.cat(terms).mean() if terms else zero  # noqa: E731
        return {"teacher_loss": cat(teacher_terms), "gt_loss": cat(gt_terms), "iou_loss": cat(iou_terms),
                "gt_iou": float(torch.cat(gt_ious).mean()) if gt_ious else 0.0,
                "teacher_iou": float(torch.cat(teacher_ious).mean()) if teacher_ious else 0.0}


def _to_device(prompts: dict, device: torch.device) -> dict:
    out = {}
    for kind, group in prompts.items():
        out[kind] = None if group is None else {
            k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in group.items()
        }
    return out


def fine_tune(student: str | os.PathLike | StudentConfig, teacher_spec: str | ModelSpec,
              samples: list[TrainingSample], config: FineTuneConfig, teacher: Sam | None = None) -> Path:
    """Distil (encoder stage) and align (decoder stage) a student; returns the student checkpoint directory.

    ``student`` is a named config (``lightening_t``), a :class:`StudentConfig`, or an existing student
    checkpoint directory to fine-tune. Rerunning with the same ``config.out_dir`` resumes the run.
    """
    return Run(student, teacher_spec, samples, config, teacher).execute()
