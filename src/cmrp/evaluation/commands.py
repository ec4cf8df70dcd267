"""`cmrp eval CHECKPOINT_OR_RUN_DIR`: evaluate a checkpoint against a baseline, write the report, log it."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from cmrp.config import Redactor
from cmrp.data.sources import load_recipe_character
from cmrp.errors import ConfigError
from cmrp.evaluation.judge import JudgeClient
from cmrp.evaluation.mmrole_eval import format_table, run_mmrole_eval
from cmrp.registry import DECODING
from cmrp.tracking import (
    TrackingLogger,
    default_tags,
    default_tracking_uri,
    is_remote,
    open_tracked_run,
    read_run_file,
    run_history,
    run_link,
)

__all__ = ["register", "run_eval"]

TRAINING_CURVES = ["train/loss", "reward/total", "val/reward/total"]  # plotted in the report


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval",
        help="evaluate a checkpoint (vs a baseline): role-play, T2I, QA; HTML + JSON report, logged to MLflow",
        description="Evaluate the checkpoint of a `cmrp fit` run on its character's held-out split: text and "
        "multimodal role-play, text-to-image (CLIP-I, CLIP-T, DINO, diversity; FID/KID with Inception weights), "
        "knowledge-QA and VQA "
        "multiple choice, and optionally an LLM judge. For sandbox characters the shipped attribute probe "
        "also scores images for identity fidelity, prompt faithfulness and text-image agreement. Writes report.html "
        "(with the training run's curves) and eval.json and logs both to an MLflow run nested under the training run; "
        "when the tracking server is down they wait in <out>/tracking/pending.jsonl for `cmrp tracking sync <out>`. "
        "With --mmrole-tests it instead scores a model's answers (--answers, or the checkpoint's own) on MMRole's "
        "official test files as MMRole-Eval does: one request per metric to its reward model, the per-record ratio "
        "averaged per file.",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT_OR_RUN_DIR", nargs="?", default=None,
                   help="a `cmrp fit` output_dir (or its checkpoint/); not needed with --mmrole-tests and --answers")
    p.add_argument("--baseline", default="base",
                   help="`base` (default): the same architecture re-initialised from the run's backbone card; "
                   "a run directory: another checkpoint; `none`: no baseline")
    p.add_argument("--out", type=Path, default=None, help="report folder (default: <run>/eval)")
    p.add_argument("--max-items", type=int, default=32, help="items per task (default 32)")
    p.add_argument("--samples", type=int, default=4, help="images per T2I prompt (default 4)")
    p.add_argument("--steps", type=int, default=20, help="flow sampling steps (default 20)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="length limit of generated replies (default 48)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--decoding", default=None, metavar="chain|joint|think",
                   help="how images of dialogue turns are drawn (default: the run's `decoding`): after the reply "
                   "(chain), from the query alone (joint), after the reply and the character's own thinking (think)")
    p.add_argument("--features", choices=("auto", "pixel", "sandbox", "pretrained"), default="auto",
                   help="`auto` (default): `sandbox` for a sandbox character, else `pretrained`; `pretrained`: "
                   "CLIP ViT-L/14, DINOv2, LPIPS (and InceptionV3 for FID/KID when present) from local caches; "
                   "`sandbox`: the small CLIP and image-feature models trained on sandbox renders (shipped); "
                   "`pixel`: weight-free proxies")
    p.add_argument("--device", default="cpu", help="torch device for the models and feature nets (default cpu)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: the run's own, sqlite:///<run>/mlflow.db); needed when the "
                   "run's URI held a password (it was saved hidden)")
    judge = p.add_argument_group("LLM judge (optional; any OpenAI-compatible endpoint)")
    judge.add_argument("--judge-url", default=None, help="base URL, e.g. https://api.openai.com/v1")
    judge.add_argument("--judge-model", default=None, help="model name, e.g. gpt-4o")
    judge.add_argument("--judge-key-env", default=None,
                       help="name of the environment variable holding the API key (the key is never written)")
    judge.add_argument("--judge-concurrency", type=int, default=4, help="requests in flight (default 4)")
    judge.add_argument("--judge-attempts", type=int, default=3,
                       help="tries per item before a score is recorded as missing (default 3)")
    judge.add_argument("--judge-templates", type=Path, default=None,
                       help="folder of *.txt templates overriding the shipped ones (same names)")
    mmrole = p.add_argument_group(
        "MMRole-Eval on MMRole's test files",
        "protocol mmrole: one request per metric to a reward model (e.g. YanqiDai/MMRole-Eval_RM served at "
        "--judge-url), per-record ratio averaged per file; writes answers/, reviews/ and mmrole_eval.json to --out")
    mmrole.add_argument("--mmrole-tests", type=Path, default=None, metavar="DIR",
                        help="MMRole_dataset's root, its data/test, or a folder of <kind>_test.json files")
    mmrole.add_argument("--answers", type=Path, default=None, metavar="FILE",
                        help="a model's answers to score instead of a checkpoint's: MMRole's answers format (the "
                        "test records with conversations[1].answer; a file or a folder of them) or {id: answer}")
    mmrole.add_argument("--images", type=Path, default=None, metavar="DIR",
                        help="MMRole_dataset's images/ (default: the images/ folder beside the test files)")
    mmrole.add_argument("--allow-missing-images", action="store_true",
                        help="score records whose image is missing without it (counted in the report)")
    mmrole.add_argument("--mmrole-limit", type=int, default=None, metavar="N",
                        help="only the first N records of each test file (a quick check; the table needs all)")
    p.set_defaults(handler=_eval)


def _check_args(args: argparse.Namespace) -> None:
    for name in ("max_items", "samples", "steps", "max_new_tokens", "judge_concurrency", "judge_attempts",
                 "mmrole_limit"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.answers is not None and args.mmrole_tests is None:
        raise ConfigError("--answers goes with --mmrole-tests DIR (the test files the answers are for)")
    if args.mmrole_tests is not None and (args.answers is None) == (args.checkpoint is None):
        raise ConfigError("--mmrole-tests: give either a run directory (its checkpoint answers the test records) "
                          "or --answers FILE (a model's answers), not both")
    if args.answers is not None and args.judge_url is None:
        raise ConfigError("--answers: scoring needs the reward model; give --judge-url and --judge-model (e.g. a "
                          "vLLM server of YanqiDai/MMRole-Eval_RM)")
    if args.mmrole_tests is None and args.checkpoint is None:
        raise ConfigError("cmrp eval: give the run directory of a `cmrp fit` run (or --mmrole-tests with --answers)")
    if (args.judge_url is None) != (args.judge_model is None):
        raise ConfigError("--judge-url and --judge-model go together: give both to use a judge, or neither")
    if args.judge_templates is not None and not args.judge_templates.is_dir():
        raise ConfigError(f"--judge-templates {args.judge_templates}: not a folder")


_JSON_PROTOCOL = ("json: the paper's 1-7 scores, and MMRole-Eval's eight metrics in one request per turn "
                  "(for MMRole's own protocol: cmrp eval --mmrole-tests)")


def _visual_replies(items: list, model: Any, baseline: Any, task: str, k: int = 4) -> list[dict[str, Any]]:
    """The first `k` held-out turns of a task with the model's and the baseline's replies, for the report."""
    mine = model.replies.get(task, [])
    theirs = baseline.replies.get(task, []) if baseline is not None else []
    return [{"task": task, "context": it.history_text, "reference": it.reference,
             "model": mine[i] if i < len(mine) else "",
             "baseline": theirs[i] if i < len(theirs) else None}
            for i, it in enumerate(items[:k])]


def run_eval(args: argparse.Namespace) -> dict[str, Any]:
    """Everything `cmrp eval` does; returns the report dictionary (also written to eval.json)."""
    from cmrp.backbones.loading import find_checkpoint, load_checkpoint, load_recipe_of
    from cmrp.evaluation.features import load_feature_set
    from cmrp.evaluation.oracle import chance_levels, prompt_attributes, sandbox_identity
    from cmrp.evaluation.report import curves_png, intervals, log_report, write_html, write_json
    from cmrp.evaluation.runner import (
        EvalOptions,
        evaluate_model,
        load_baseline,
        load_images,
        reference_numbers,
        t2i_prompts,
        turn_items,
    )

    _check_args(args)
    t0 = time.perf_counter()
    redactor = Redactor.from_environ()  # read once: every name and message below is redacted with it
    ckpt = find_checkpoint(args.checkpoint)
    run_dir = ckpt.parent
    cfg = load_recipe_of(ckpt)
    if args.decoding is not None:  # evaluate the same weights with another decoding
        DECODING.get(args.decoding, where="--decoding")  # an unknown name: one line naming the known ones
        cfg.decoding = args.decoding
    character = load_recipe_character(cfg.data, run_dir)
    out = (args.out or run_dir / "eval").expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    opts = EvalOptions(max_items=args.max_items, samples=args.samples, steps=args.steps,
                       max_new_tokens=args.max_new_tokens, seed=args.seed)
    features = args.features
    if features == "auto":  # the sandbox's own feature models read sandbox images; pretrained ones the rest
        features = "sandbox" if sandbox_identity(character) is not None else "pretrained"
    feats = load_feature_set(features, device=args.device)
    judge = None
    if args.judge_url:
        judge = JudgeClient(args.judge_url, args.judge_model, api_key_env=args.judge_key_env,
                            cache_dir=out / "judge-cache", templates_dir=args.judge_templates,
                            concurrency=args.judge_concurrency, max_attempts=args.judge_attempts)

    model = load_checkpoint(ckpt, cfg).to(args.device)
    size = (model.image_size, model.image_size)
    model_eval = evaluate_model(model, character, cfg, feats, opts, judge, label="eval model")
    del model
    baseline_eval, baseline_source = None, None
    if args.baseline != "none":
        baseline, baseline_source = load_baseline(args.baseline, cfg, character)
        baseline_eval = evaluate_model(baseline.to(args.device), character, cfg, feats, opts, judge,
                                       label="eval baseline")
        del baseline

    settings = {"max_items": opts.max_items, "samples": opts.samples, "steps": opts.steps,
                "max_new_tokens": opts.max_new_tokens, "seed": opts.seed, "decoding": cfg.decoding}
    report: dict[str, Any] = {
        "checkpoint": str(ckpt),
        "character": character.name,
        "features": feats.name,
        "feature_notes": feats.notes,
        "baseline_source": baseline_source,
        "settings": settings,
        "judge_endpoint": f"{judge.url} ({judge.model})" if judge is not None else None,
        "judge_protocol": _JSON_PROTOCOL if judge is not None else None,
        "model": {"numbers": model_eval.numbers, "timings": model_eval.timings,
                  "intervals": intervals(model_eval.numbers, model_eval.samples)},
        "baseline": {"numbers": baseline_eval.numbers, "timings": baseline_eval.timings,
                     "intervals": intervals(baseline_eval.numbers, baseline_eval.samples)} if baseline_eval else None,
        "reference": reference_numbers(character, cfg, feats, opts, size),
    }
    prompts = t2i_prompts(character, cfg, opts.max_items)
    images = {**character.train.images, **character.test.images}
    report["oracle"] = chance_levels(character, [prompt_attributes(p.prompt, images.get(p.image_id))
                                                 for p in prompts])  # None unless a sandbox character
    refs = character.reference_images
    fallback = refs[0] if refs else None
    targets = [images.get(p.image_id) if p.image_id in images else fallback for p in prompts]
    text_items, mm_items = turn_items(character, opts.max_items)
    visuals: dict[str, Any] = {
        "references": list(load_images(refs[:8], size)),
        "t2i_prompts": [p.prompt for p in prompts],
        "t2i_targets": [(load_images([t], size)[0] if t is not None else None) for t in targets],
        "t2i_model": model_eval.t2i_images,
        "t2i_baseline": baseline_eval.t2i_images if baseline_eval else [],
        "replies": _visual_replies(text_items, model_eval, baseline_eval, "text_roleplay")
        + _visual_replies(mm_items, model_eval, baseline_eval, "multimodal_roleplay", k=2),
    }
    uri, trained = _run_uri(args, cfg, run_dir), read_run_file(run_dir)
    training = _training_run(uri, trained, redactor)
    # from the moment the run exists: an interrupt ends it KILLED, not RUNNING
    with open_tracked_run(lambda: _eval_logger(uri, trained, cfg, run_dir, out, redactor)) as logger:
        history, source = run_history(run_dir, uri, TRAINING_CURVES, redactor)
        training["history_source"] = source
        visuals["curves"] = curves_png(history, f"training run {training.get('run_id') or run_dir.name}")
        report["training_run"] = training
        report["mlflow"] = {"tracking_uri": logger.display_uri, "run_id": logger.run_id, "link": logger.link(),
                            "note": f"not logged yet: cmrp tracking sync {out}" if logger.offline else None}
        report["timings"] = {"total_s": time.perf_counter() - t0}
        json_path = write_json(report, out / "eval.json")
        html_path = write_html(report, visuals, out / "report.html")
        log_report(logger, report, [json_path, html_path])
    report["mlflow"]["pending"] = str(logger.pending) if logger.offline else None
    report["mlflow"]["hint"] = logger.hint()
    report["files"] = {"json": str(json_path), "html": str(html_path)}
    return report


def _eval_mmrole(args: argparse.Namespace) -> int:
    report = run_mmrole_eval(args)
    if report.get("rows"):
        print(f"MMRole-Eval, protocol {report['protocol']} (one request per metric), judge {report['judge_endpoint']}")
        print(format_table(report["rows"]))
        if report["without_image"] or report["missing_scores"]:
            print(f"note: {report['without_image']} record(s) scored without their image, "
                  f"{report['missing_scores']} score(s) missing (unreadable after retries)")
        print(f"reviews:     {report['reviews']}")
    else:
        print(f"answers:     {report['answers']}  (score them: add --judge-url URL --judge-model MODEL)")
    print(f"numbers:     {report['files']['json']}")
    return 0


def _run_uri(args: argparse.Namespace, cfg: Any, run_dir: Path) -> str:
    """The URI to connect to: --tracking-uri, else the run's (as its recipe.yaml saved it: a password in it
    was hidden, and connecting then asks for --tracking-uri), else the run's own database."""
    return args.tracking_uri or cfg.tracking.tracking_uri or default_tracking_uri(run_dir)


def _eval_logger(uri: str, trained: dict[str, Any], cfg: Any, run_dir: Path, out: Path,
                 redactor: Any) -> TrackingLogger:
    """The evaluation's MLflow run at `uri`, nested under the training run `trained` (its run file: same
    experiment, `mlflow.parentRunId`). A server that is down: records go to <out>/tracking/pending.jsonl."""
    tags = {**default_tags("eval"), "cmrp.checkpoint": str(run_dir / "checkpoint")}
    if trained.get("run_id"):
        tags.update({"mlflow.parentRunId": trained["run_id"], "cmrp.train_run_id": trained["run_id"]})
    return TrackingLogger(uri, cfg.tracking.experiment, "eval", out, tags=tags, redactor=redactor,
                          artifact_location=None if is_remote(uri) else (run_dir / "mlartifacts").as_uri())


def _training_run(uri: str, trained: dict[str, Any], redactor: Any) -> dict[str, Any]:
    """What is known of the training run the evaluation belongs to (its run file, tracked at `uri`)."""
    return {"run_id": trained.get("run_id"), "tracking_uri": redactor.text(uri),
            "link": run_link(redactor.text(uri), trained.get("experiment_id"), trained.get("run_id")),
            "note": None if trained.get("run_id") else "the training run recorded no MLflow run id"}


def _eval(args: argparse.Namespace) -> int:
    if args.mmrole_tests is not None:
        _check_args(args)
        return _eval_mmrole(args)
    report = run_eval(args)
    model = report["model"]["numbers"]
    base = (report.get("baseline") or {}).get("numbers") or {}
    print(f"character:   {report['character']}   (features: {report['features']})")
    lines = [("knowledge_qa", "mcq_acc_likelihood"), ("vqa", "mcq_acc_likelihood"), ("t2i", "clip_i_references"),
             ("t2i", "clip_t"), ("t2i", "dino_references"), ("t2i", "diversity"), ("t2i", "identity_fidelity"),
             ("t2i", "prompt_faithfulness"),
             ("text_roleplay", "distinct_2"), ("multimodal_roleplay", "cross_modal_clip_t"),
             ("judge", "mmrole_overall")]
    for task, key in lines:
        a = model.get(task, {}).get(key)
        if not isinstance(a, int | float):
            continue
        b = base.get(task, {}).get(key)
        tail = f"   (baseline {b:.3f})" if isinstance(b, int | float) and b == b else ""
        print(f"{task + '/' + key + ':':<42}{a:.3f}{tail}")
    print(f"report:      {report['files']['html']}")
    print(f"numbers:     {report['files']['json']}")
    mlflow = report["mlflow"]
    print(f"MLflow run:  {mlflow['run_id'] or '(not created: server unreachable)'} in {mlflow['tracking_uri']}"
          + (f", nested under training run {report['training_run']['run_id']}"
             if report["training_run"].get("run_id") else ""))
    if mlflow["pending"]:
        print(f"  not logged: {mlflow['pending']} — upload with: cmrp tracking sync {Path(mlflow['pending']).parents[1]}")
    else:
        print(f"  browse with: {mlflow['hint']}")
    return 0
