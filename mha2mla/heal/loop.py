"""`mha2mla heal`: fine-tune a converted checkpoint so that it recovers what the conversion lost.

One loop on 🤗 accelerate: CPU, one GPU, or many (DDP / FSDP via ``accelerate launch --config_file
recipes/accelerate/...``); bf16 autocast, gradient accumulation and checkpointing are recipe settings. The loss is
next-token cross-entropy, optionally mixed with distillation from a teacher (e.g. the source model). The latent norm
that the converter made linear is trained in an exactly equivalent, well-scaled form (see :mod:`mha2mla.heal.losses`), so
the loss of step 0 equals the converted model's and early steps stay stable. Runs save resumable checkpoints; the
result is again a stock ``DeepseekV3ForCausalLM`` directory with a ``heal`` record in ``mha2mla.json``.

>>> heal(model="out/smollm2-mla", output="out/smollm2-mla-healed", data="train.txt",
...      recipe="recipes/smollm2-135m-cpu.yaml", max_steps=20)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable

import torch

from mha2mla.allocator import HEAP_MMAP_THRESHOLD, bound_heap
from mha2mla.data import token_blocks
from mha2mla.loading import load_tokenizer, quiet_loading
from mha2mla.errors import Mha2mlaError
from mha2mla.heal.files import finish_output, latest_checkpoint, model_card, read_trainer_state, save_checkpoint
from mha2mla.heal.files import prepare_tokens, write_loss_plot
from mha2mla.heal.losses import activation_bytes, auto_loss_chunk_tokens, block_indices, chunked_lm_loss
from mha2mla.heal.losses import measure_latent_scales, register_sdpa, select_trainable, split_head
from mha2mla.heal.losses import ScaledHeadEmbedding, tied_embedding_scale, to_stock_state_dict, to_training_form
from mha2mla.heal.recipe import RESUMABLE_CHANGES, HealRecipe, load_recipe, lr_factor
from mha2mla.checkpoint.writer import _pid_alive, check_output_path

__all__ = ["heal"]

logger = logging.getLogger(__name__)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _make_accelerator(rc: HealRecipe):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState, PartialState
    from accelerate.utils import DistributedType, InitProcessGroupKwargs

    if AcceleratorState._shared_state:  # an earlier run in this process (tests, notebooks) fixed other settings
        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()
    # Long barrier timeout: the main process tokenises the data while the others wait.
    kwargs = [InitProcessGroupKwargs(timeout=datetime.timedelta(hours=4))]
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    # accelerate joins processes on a machine without an accelerator only when asked for the CPU (gloo); its FSDP
    # launcher does not ask, so say it here. FSDP itself is then switched on below: accelerate's FSDP2 path runs on
    # CPU tensors, it just never selects it for MULTI_CPU.
    cpu = world > 1 and not torch.cuda.is_available()
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    plugin = None
    if cpu and fsdp:
        from accelerate.utils import FullyShardedDataParallelPlugin

        plugin = FullyShardedDataParallelPlugin()  # its settings come from the launcher's environment
    acc = Accelerator(mixed_precision=rc.mixed_precision, gradient_accumulation_steps=rc.gradient_accumulation_steps,
                      kwargs_handlers=kwargs, cpu=cpu, fsdp_plugin=plugin)
    if plugin is not None and acc.distributed_type == DistributedType.MULTI_CPU:
        acc.state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        acc.state.fsdp_plugin = plugin
    if acc.num_processes != world:  # each process would heal alone and all would write the same output
        raise Mha2mlaError(f"the launcher started {world} processes but accelerate joined {acc.num_processes}; "
                           "check the accelerate config (distributed_type, use_cpu)")
    return acc


def _load_lm(path: str, what: str, dtype: torch.dtype, attn: str = "auto"):
    from transformers import AutoModelForCausalLM

    if not os.path.isfile(os.path.join(path, "config.json")):
        raise Mha2mlaError(f"{what} {path!r} is not a model directory (no config.json)")
    try:
        with quiet_loading():
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype,
                                                         attn_implementation="eager" if attn == "eager" else None)
        if attn != "eager":
            _use_sdpa(model, path, what, required=attn == "sdpa")
        return model
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise Mha2mlaError(f"{what} {path!r}: cannot load it as a causal LM ({first[:200]})") from None


def _use_sdpa(model, path: str, what: str, *, required: bool) -> None:
    """Switch ``model`` to the padded SDPA attention (heal_ops.SDPA) if its class supports SDPA."""
    if not getattr(model, "_supports_sdpa", False):
        if required:
            raise Mha2mlaError(f"attn_implementation: sdpa, but the {what} {path!r} ({type(model).__name__}) does not support it")
        return
    model.set_attn_implementation(register_sdpa())


def _memory_plan(rc: HealRecipe, net) -> dict:
    """The recipe's memory settings with ``auto`` resolved for this model and micro-batch.

    Gradient checkpointing pays when the activations kept for the backward pass would outweigh the weights,
    gradients and AdamW moments; below that it costs a second forward pass for little memory.
    """
    n_params = sum(p.numel() for p in net.parameters())
    state = n_params * (net.dtype.itemsize * 2 + 8)  # weights and gradients in the training dtype, AdamW's 2 fp32 moments
    act = activation_bytes(net.config, tokens=rc.tokens_per_micro_batch,
                           bytes_per_value=2 if rc.mixed_precision == "bf16" or rc.dtype == "bfloat16" else 4)
    gc = rc.gradient_checkpointing
    if gc == "auto":
        gc = bool(getattr(net, "supports_gradient_checkpointing", False)) and act > state
    chunk = rc.loss_chunk_tokens or auto_loss_chunk_tokens(_vocab(net))
    return {"gradient_checkpointing": bool(gc), "estimated_activation_bytes": act, "training_state_bytes": state,
            "attn_implementation": net.config._attn_implementation, "loss_chunk_tokens": chunk}


def _tie_scale(net, model_dir: str, dtype: torch.dtype) -> float | None:
    """The residual scale if the checkpoint's embedding is its head in that scale (a converted tied source), else None."""
    candidates = [1.0]
    path = os.path.join(model_dir, "mha2mla.json")
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                scale = (json.load(f).get("plan") or {}).get("residual_scale")
        except (OSError, ValueError, AttributeError):  # an unreadable record: only an unscaled tie is recognised
            scale = None
        if isinstance(scale, (int, float)) and scale > 0:
            candidates.insert(0, float(scale))
    return tied_embedding_scale(net, candidates=tuple(candidates), dtype=dtype)


def _tie(net, scale: float) -> list:
    """Replace ``net``'s input embedding by its head times ``scale``; returns [embedding key, head key, scale]."""
    emb, head = net.get_input_embeddings(), net.get_output_embeddings()
    names = {id(m): n for n, m in net.named_modules()}
    net.set_input_embeddings(ScaledHeadEmbedding(head, scale, padding_idx=emb.padding_idx))
    return [f"{names[id(emb)]}.weight", f"{names[id(head)]}.weight", scale]


def _load_tokenizer(path: str, what: str):
    return load_tokenizer(path, what=what)


def _vocab(model) -> int:
    return int(model.get_output_embeddings().weight.shape[0])


def _check_teacher(teacher, teacher_path: str, student, tokenizer) -> None:
    if _vocab(teacher) != _vocab(student):
        raise Mha2mlaError(
            f"teacher {teacher_path!r} has a vocabulary of {_vocab(teacher)} logits, the model {_vocab(student)}; "
            "distillation needs the same tokenizer"
        )
    if os.path.isfile(os.path.join(teacher_path, "tokenizer.json")) or os.path.isfile(
        os.path.join(teacher_path, "tokenizer_config.json")
    ):
        theirs = _load_tokenizer(teacher_path, "teacher").get_vocab()
        if theirs != tokenizer.get_vocab():
            n = sum(1 for k, v in theirs.items() if tokenizer.get_vocab().get(k) != v)
            raise Mha2mlaError(f"teacher {teacher_path!r} has a different tokenizer ({n} tokens differ); distillation needs the same one")


def _local(spec: str | None) -> str | None:
    return spec if spec is not None and os.path.exists(spec) else None


def _abs_if_local(spec: str | None) -> str | None:
    return os.path.abspath(spec) if spec is not None and os.path.exists(spec) else spec


def _check_resumable(state: dict, rc: HealRecipe, model_dir: str, processes: int, ckpt: str) -> None:
    old, new = state["recipe"], rc.to_dict()
    diff = [k for k in new if k not in RESUMABLE_CHANGES and old.get(k) != new[k]]
    if diff:
        changes = "; ".join(f"{k}: {old.get(k)!r} then, {new[k]!r} now" for k in diff)
        raise Mha2mlaError(f"--resume: {ckpt} was made with other settings ({changes}); use the same ones or start over with --force")
    if state["model"] != model_dir:
        raise Mha2mlaError(f"--resume: {ckpt} healed {state['model']!r}, not {model_dir!r}")
    if state["num_processes"] != processes:
        raise Mha2mlaError(f"--resume: {ckpt} ran on {state['num_processes']} processes, this run has {processes}; the data split depends on it")


def _prepare_output(output: str, *, resume: bool, force: bool) -> str | None:
    """Apply the overwrite policy; return the checkpoint to resume from, if any."""
    if resume:
        ckpt = latest_checkpoint(output)
        if ckpt is None:
            raise Mha2mlaError(f"--resume: {output} has no checkpoint (checkpoints/step-N) to resume from; "
                               "drop --resume to start a new run")
        return ckpt
    if os.path.exists(output) and os.listdir(output) and not force:
        raise Mha2mlaError(f"{output} exists; pass --force to replace it, or --resume to continue its run")
    return None


def _check_mla(model_dir: str, given: str) -> None:
    """Refuse a model that is not an MLA checkpoint: healing a plain Llama would silently write a healed Llama."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise Mha2mlaError(f"model {given!r} is not a model directory (no config.json)")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise Mha2mlaError(f"model {given!r}: config.json is not valid JSON ({e})") from None
    if not isinstance(cfg, dict) or not cfg.get("kv_lora_rank"):
        kind = cfg.get("model_type") if isinstance(cfg, dict) else None
        raise Mha2mlaError(f"model {given!r} is a {kind or 'non-MLA'} checkpoint, not an MLA one (no kv_lora_rank); "
                           "convert it first with mha2mla convert")


def _set_aside(output: str) -> str:
    """Move an existing ``output`` to a hidden sibling (one rename), so a failed run can put it back."""
    parent, name = os.path.split(output)
    for n in os.listdir(parent):  # left by a killed run whose process is gone: the newer run's output won
        if n.startswith(f".{name}{_ASIDE}") and not _pid_alive(_pid_of(n)):
            shutil.rmtree(os.path.join(parent, n), ignore_errors=True)
    aside = os.path.join(parent, f".{name}{_ASIDE}{os.getpid()}")
    os.replace(output, aside)
    return aside


_ASIDE = ".mha2mla-replaced-"


def _pid_of(name: str) -> int:
    try:
        return int(name.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def heal(
    *,
    model: str | os.PathLike,
    output: str | os.PathLike,
    data: str | None = None,
    recipe: str | os.PathLike | dict | HealRecipe | None = None,
    teacher: str | os.PathLike | None = None,
    max_steps: int | None = None,
    resume: bool = False,
    force: bool = False,
    on_step: Callable[[int, dict], None] | None = None,
    **overrides,
) -> dict:
    """Fine-tune the converted checkpoint ``model`` and write the healed one to ``output``.

    Args:
        model: a converted MLA (DeepseekV3) checkpoint directory (one with ``kv_lora_rank``).
        output: the healed checkpoint directory; its ``checkpoints/`` holds resumable state while it runs.
        data: text/JSONL file, directory, or ``hf:DATASET`` (overrides the recipe's ``data``).
        recipe: YAML path, mapping or :class:`HealRecipe`; None for the defaults.
        teacher: a causal-LM directory with the same tokenizer; adds distillation (overrides the recipe's ``teacher``).
        max_steps: optimizer steps (overrides the recipe).
        resume: continue from the newest checkpoint in ``output/checkpoints`` (same losses as an uninterrupted run).
        force: replace an existing ``output`` of this tool; it is set aside and restored if the run fails before it
            has a checkpoint or a model to show.
        on_step: called as ``on_step(step, info)`` after each optimizer step (and after its checkpoint).
        **overrides: any other recipe key, e.g. ``lr=3e-4``; None values are ignored.

    Returns:
        The ``heal`` record written into ``output/mha2mla.json``.

    Raises:
        Mha2mlaError: bad model, data, recipe, teacher or output.
    """
    t_start = time.time()
    rc = load_recipe(recipe, data=data, teacher=None if teacher is None else os.fspath(teacher), max_steps=max_steps, **overrides)
    if rc.data is None:
        raise Mha2mlaError("no data: pass --data (a .txt/.jsonl file, a directory, or hf:DATASET) or set data: in the recipe")
    rc = dataclasses.replace(rc, data=_abs_if_local(rc.data), teacher=_abs_if_local(rc.teacher))
    model_dir = os.path.abspath(os.fspath(model))
    if not os.path.isdir(model_dir):
        raise Mha2mlaError(f"model {os.fspath(model)!r} does not exist or is not a directory")
    if rc.teacher is not None and not os.path.isdir(rc.teacher):
        raise Mha2mlaError(f"teacher {rc.teacher!r} does not exist or is not a directory")
    _check_mla(model_dir, os.fspath(model))
    # One guard for every command that replaces a directory: never the working or home directory, a root, a
    # directory we did not write, nor one holding the model, the teacher or the data.
    output = check_output_path(os.fspath(output), force=force or resume,
                               protect=(("model", model_dir), ("teacher", rc.teacher), ("data", _local(rc.data))))

    acc = _make_accelerator(rc)
    if not acc.is_main_process:
        logger.setLevel(logging.WARNING)  # one log per run, not one per process
    ckpt = _prepare_output(output, resume=resume, force=force) if acc.is_main_process else None
    ckpt = _broadcast(acc, ckpt)
    aside = None
    if ckpt is None and acc.is_main_process and os.path.isdir(output):
        aside = _set_aside(output)  # --force: the old output stays whole until the new one is written
    acc.wait_for_everyone()
    created = not os.path.exists(output)
    try:
        rec = _run(acc, rc, model_dir=model_dir, output=output, ckpt=ckpt, on_step=on_step, t_start=t_start)
    except BaseException:
        if acc.is_main_process and created and latest_checkpoint(output) is None:
            shutil.rmtree(output, ignore_errors=True)  # nothing worth keeping (at most the token cache)
            if aside is not None:
                os.replace(aside, output)  # a failed --force run leaves the old output as it was
                aside = None
        raise
    finally:  # the old output goes once the new run has a model or a resumable checkpoint in its place
        if aside is not None and acc.is_main_process:
            shutil.rmtree(aside, ignore_errors=True)
    return rec


def _run(acc, rc: HealRecipe, *, model_dir: str, output: str, ckpt: str | None, on_step, t_start: float) -> dict:
    from accelerate.utils import set_seed

    procs, rank = acc.num_processes, acc.process_index
    state = read_trainer_state(ckpt) if ckpt else None
    if state:
        _check_resumable(state, rc, model_dir, procs, ckpt)
    set_seed(rc.seed)
    bounded_heap = acc.device.type == "cpu" and bound_heap(HEAP_MMAP_THRESHOLD)  # before the models and data are allocated
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise Mha2mlaError(f"model {model_dir!r} is not a model directory (no config.json)")
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        cfg_json = json.load(f)
    tokenizer = _load_tokenizer(model_dir, "model")
    max_pos = cfg_json.get("max_position_embeddings")
    if max_pos is not None and rc.seq_len > max_pos:
        raise Mha2mlaError(f"seq_len {rc.seq_len} exceeds the model's max_position_embeddings {max_pos}; use a shorter one")
    tokens = prepare_tokens(acc, output, data=rc.data, tokenizer=tokenizer, text_field=rc.text_field,
                            max_docs=rc.max_docs, max_tokens=rc.max_data_tokens)
    blocks = token_blocks(tokens, seq_len=rc.seq_len)
    n_blocks, mbs, ga = blocks.shape[0], rc.micro_batch_size, rc.gradient_accumulation_steps
    rows_per_step = mbs * ga * procs
    logger.info("data %s: %d blocks of %d tokens; %d steps read %.2f epochs", rc.data, n_blocks, rc.seq_len,
                rc.max_steps, rc.max_steps * rows_per_step / n_blocks)
    net = _load_lm(model_dir, "model", _DTYPES[rc.dtype], rc.attn_implementation)
    if _vocab(net) < len(tokenizer):
        raise Mha2mlaError(f"model {model_dir!r} has {_vocab(net)} logits but its tokenizer {len(tokenizer)} tokens")
    save_dtype = getattr(torch, str(cfg_json.get("dtype") or cfg_json.get("torch_dtype") or "float32"), torch.float32)
    teacher_net = None
    if rc.teacher is not None:  # inference only: bf16 on a GPU or under bf16 autocast
        bf16 = rc.mixed_precision == "bf16" or (acc.device.type == "cuda" and torch.cuda.is_bf16_supported())
        t_dtype = torch.bfloat16 if bf16 else _DTYPES[rc.dtype]
        teacher_net = _load_lm(rc.teacher, "teacher", t_dtype, rc.attn_implementation)
        teacher_net = teacher_net.to(acc.device).eval().requires_grad_(False)
        _check_teacher(teacher_net, rc.teacher, net, tokenizer)
    net.to(acc.device)
    plan = _memory_plan(rc, net)
    plan["heap_mmap_threshold"] = HEAP_MMAP_THRESHOLD if bounded_heap else None
    # The fused head needs the head's weight outside the model's forward: not under FSDP, which shards it.
    fuse_head = acc.distributed_type.value != "FSDP"
    plan["fused_head"] = fuse_head
    plan["teacher_dtype"] = None if teacher_net is None else str(teacher_net.dtype).removeprefix("torch.")
    logger.info("memory: gradient checkpointing %s (activations ~%.1f GiB, training state ~%.1f GiB), attention %s, "
                "loss in chunks of %d tokens%s", "on" if plan["gradient_checkpointing"] else "off",
                plan["estimated_activation_bytes"] / 2**30, plan["training_state_bytes"] / 2**30,
                plan["attn_implementation"], plan["loss_chunk_tokens"],
                "" if teacher_net is None else f", teacher in {plan['teacher_dtype']}")
    base_net = net

    def batch_at(pos: int) -> torch.Tensor:  # this process's rows of global micro-batch `pos`
        idx = block_indices((pos * procs + rank) * mbs, mbs, n_blocks=n_blocks, seed=rc.seed)
        return blocks[idx].to(device=acc.device, dtype=torch.long)

    def losses_on(module, ids: torch.Tensor):  # the heads are split off: no full-vocabulary logits are made
        with acc.autocast():
            t_hidden, t_weight = None, None
            if teacher_net is not None:
                with torch.inference_mode(), split_head(teacher_net, enabled=fuse_head) as t_weight:
                    t_hidden = teacher_net(input_ids=ids, use_cache=False).logits
            with split_head(base_net, enabled=fuse_head) as weight:
                hidden = module(input_ids=ids, use_cache=False).logits
            return chunked_lm_loss(hidden, weight, ids, t_hidden, t_weight, alpha=rc.distill_alpha,
                                   temperature=rc.distill_temperature, chunk_tokens=plan["loss_chunk_tokens"])

    if state is None:  # the converted model's loss on the batches of step 0, before any change of form
        net.eval()
        with torch.no_grad():
            ref = torch.stack([losses_on(net, batch_at(m))[0].float() for m in range(ga)]).mean()
        step0_converted = float(acc.reduce(ref, reduction="mean"))
    else:
        step0_converted = state["step0_converted_loss"]

    scales = state["latent_scales"] if state else (measure_latent_scales(net) if rc.latent_rescale else {})
    to_training_form(net, scales)
    if state:  # [embedding key, head key, scale] or None, as the run being resumed had it
        tie_scale = state["tied_embedding"][-1] if state.get("tied_embedding") else None
    else:  # not under FSDP, whose sharded head the embedding's lookup cannot read (FSDP runs are for large, untied models)
        tie = rc.tie_embeddings and acc.distributed_type.value != "FSDP"
        tie_scale = _tie_scale(net, model_dir, save_dtype) if tie else None
    tied = None if tie_scale is None else _tie(net, tie_scale)
    plan["tied_embedding"] = tied
    if not select_trainable(net, train=rc.train, freeze_latent_norm=rc.freeze_latent_norm):
        raise Mha2mlaError(f"train: {rc.train!r} selects no parameters of {model_dir!r}")
    use_cache = net.config.use_cache
    if plan["gradient_checkpointing"]:
        if hasattr(net, "activation_checkpointing_enable"):  # the name since transformers 5.x
            net.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    net.train()
    params = [p for p in net.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": rc.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    # fused: one kernel per step, without the per-tensor temporaries of the default implementation (same update)
    fused = acc.device.type in ("cpu", "cuda") and acc.distributed_type.value in ("NO", "MULTI_GPU")
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=rc.lr, betas=(rc.adam_beta1, rc.adam_beta2),
                                  eps=rc.adam_eps, fused=fused or None)
    plan["fused_adamw"] = fused
    net, optimizer = acc.prepare(net, optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(rc, s))

    hist = {"losses": [], "ce": [], "kd": [], "lr": [], "grad_norm": []}
    step, resumed_from = 0, []
    if state:
        try:
            acc.load_state(ckpt)
        except Exception as e:  # a truncated or corrupt file of the checkpoint
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise Mha2mlaError(f"--resume: checkpoint {ckpt} cannot be read ({first}); delete it to resume from an "
                               "earlier one, or start over with --force") from None
        scheduler.load_state_dict(state["scheduler"])
        step, hist, resumed_from = state["step"], state["history"], state["resumed_from"] + [state["step"]]
        logger.info("resumed from %s at step %d", ckpt, step)

    def trainer_state() -> dict:
        return {"step": step, "data_position": step * ga, "tokens": step * rows_per_step * rc.seq_len, "history": hist,
                "latent_scales": scales, "tied_embedding": tied, "step0_converted_loss": step0_converted, "recipe": rc.to_dict(),
                "model": model_dir, "num_processes": procs, "scheduler": scheduler.state_dict(),
                "resumed_from": resumed_from}

    trainable = [p for p in net.parameters() if p.requires_grad]
    t_loop, first_step, saved_at = time.time(), step, (state["step"] if state else None)

    def tokens_per_second(seconds: float) -> float:  # training tokens of this run's steps (not of resumed ones)
        return (step - first_step) * rows_per_step * rc.seq_len / max(seconds, 1e-9)
    try:
        while step < rc.max_steps:
            lr = scheduler.get_last_lr()[0]
            parts, gnorm = [], None
            for m in range(ga):
                ids = batch_at(step * ga + m)
                with acc.accumulate(net):
                    loss, ce, kd = losses_on(net, ids)
                    acc.backward(loss)
                    if acc.sync_gradients:
                        if rc.max_grad_norm > 0:
                            gnorm = float(acc.clip_grad_norm_(trainable, rc.max_grad_norm))
                        optimizer.step()
                        scheduler.step()
                        optimizer.zero_grad(set_to_none=True)
                parts.append(torch.stack([loss.detach().float(), ce.detach().float(), (ce if kd is None else kd).detach().float()]))
            loss_, ce_, kd_ = acc.reduce(torch.stack(parts).mean(0), reduction="mean").tolist()
            step += 1
            hist["losses"].append(loss_)
            hist["ce"].append(ce_)
            if teacher_net is not None:
                hist["kd"].append(kd_)
            hist["lr"].append(lr)
            hist["grad_norm"].append(gnorm)
            if not math.isfinite(loss_):
                raise Mha2mlaError(f"loss became {loss_} at step {step}; lower lr (now {rc.lr}) or check the data")
            if step == 1:
                logger.info("step 0: loss %.6f; the converted model's on the same batch %.6f (|diff| %.2e)", loss_,
                            step0_converted, abs(loss_ - step0_converted))
            if step % rc.log_every == 0 or step == rc.max_steps:
                tok_s = tokens_per_second(time.time() - t_loop)
                kd_txt = f"  kd {kd_:.4f}" if teacher_net is not None else ""
                logger.info("step %d/%d  loss %.4f  ce %.4f%s  lr %.2e  grad-norm %s  %.0f tok/s", step, rc.max_steps,
                            loss_, ce_, kd_txt, lr, "-" if gnorm is None else f"{gnorm:.3f}", tok_s)
            if rc.save_every and (step % rc.save_every == 0 or step == rc.max_steps):
                save_checkpoint(acc, output, step, trainer_state(), keep=rc.keep_checkpoints)
                saved_at = step
            if on_step is not None:
                on_step(step, {"loss": loss_, "ce": ce_, "lr": lr, "grad_norm": gnorm})
    except KeyboardInterrupt:
        where = f"continue from step {saved_at} with --resume" if saved_at else "no checkpoint was saved"
        logger.warning("interrupted at step %d; %s", step, where)
        raise

    loop_s = time.time() - t_loop
    peak_mem = torch.cuda.max_memory_allocated(acc.device) if acc.device.type == "cuda" else None
    full = acc.get_state_dict(net)  # every process takes part (sharded models gather here)
    record = {
        "source": model_dir, "data": rc.data, "teacher": rc.teacher, "steps": step,
        "tokens": step * rows_per_step * rc.seq_len, "num_processes": procs,
        "step0": {"converted_loss": step0_converted, "training_loss": hist["losses"][0] if hist["losses"] else None},
        **hist, "latent_scales": scales, "trainable_parameters": sum(p.numel() for p in trainable),
        "resumed_from": resumed_from, "recipe": rc.to_dict(), "seconds": round(time.time() - t_start, 1),
        "tokens_per_second": round(tokens_per_second(loop_s), 1) if step > first_step else None,
        "peak_device_memory_bytes": peak_mem, "memory": plan,
        "versions": _versions(),
    }
    if acc.is_main_process:
        unwrapped = acc.unwrap_model(net)
        if plan["gradient_checkpointing"]:
            getattr(unwrapped, "activation_checkpointing_disable", unwrapped.gradient_checkpointing_disable)()
        if unwrapped.config._attn_implementation == register_sdpa():  # the saved model must not need mha2mla
            unwrapped.set_attn_implementation("sdpa")
        unwrapped.config.use_cache = use_cache
        r = getattr(unwrapped.config, "kv_lora_rank", None) or 0
        stock = _cast(to_stock_state_dict(full, scales, r, tied=tied), save_dtype)
        if tied is not None:  # the stock embedding module again, for save_pretrained
            emb = torch.nn.Embedding.from_pretrained(stock[tied[0]], freeze=True,
                                                     padding_idx=unwrapped.get_input_embeddings().padding_idx)
            unwrapped.set_input_embeddings(emb)
        finish_output(output, lambda tmp: _write_final(tmp, unwrapped, stock, save_dtype, tokenizer, model_dir, record),
                      keep_checkpoints=rc.keep_checkpoints_at_end)
        logger.info("wrote %s", output)
    acc.wait_for_everyone()
    return record


def _broadcast(acc, value):
    if acc.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value])[0]


def _cast(state_dict: dict, dtype: torch.dtype) -> dict:
    seen: dict[int, torch.Tensor] = {}  # keep tied tensors tied
    out = {}
    for k, t in state_dict.items():
        if t.is_floating_point() and t.dtype != dtype:
            key = id(t)
            seen.setdefault(key, t.detach().to("cpu", dtype))
            out[k] = seen[key]
        else:
            out[k] = t.detach().cpu()
    return out


def _versions() -> dict:
    import accelerate
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "accelerate": accelerate.__version__}


def _write_final(tmp: str, unwrapped, state_dict: dict, dtype: torch.dtype, tokenizer, model_dir: str, record: dict) -> None:
    unwrapped.save_pretrained(tmp, state_dict=state_dict)
    unwrapped.config.dtype = dtype  # save_pretrained wrote the training dtype; the tensors are in `dtype`
    unwrapped.config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    conv = {}
    conv_path = os.path.join(model_dir, "mha2mla.json")
    if os.path.isfile(conv_path):
        with open(conv_path, encoding="utf-8") as f:
            conv = json.load(f)
    if "heal" in conv:
        record = {**record, "previous": conv["heal"]}
    conv["heal"] = record
    with open(os.path.join(tmp, "mha2mla.json"), "w", encoding="utf-8") as f:
        json.dump(conv, f, indent=1)
    card_path = os.path.join(model_dir, "README.md")
    card = None
    if os.path.isfile(card_path):
        with open(card_path, encoding="utf-8") as f:
            card = f.read()
    with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
        f.write(model_card(card, record))
    write_loss_plot(os.path.join(tmp, "loss.png"), record["losses"], title=f"mha2mla heal: {os.path.basename(model_dir)}",
                    step0_reference=record["step0"]["converted_loss"])
