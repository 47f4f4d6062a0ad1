"""Targeted, behaviour-changing mutants of experiments/ (docs/findings/mutation_testing.md):
(id, area, file, old text, new text); TESTS maps an area to (before, after) pytest arguments."""
# (id, area, file, old, new); the area picks the test files (TESTS)
LINK_B = ["before_tests/test_link.py"]; LINK_A = ["tests/test_link.py", "tests/test_mutation_guards.py"]
TRACE_B = ["before_tests/test_trace.py"]; TRACE_A = ["tests/test_trace.py", "tests/test_mutation_guards.py"]
PROBE_B = ["before_tests/test_sharpness.py"]; PROBE_A = ["tests/test_sharpness.py", "tests/test_mutation_guards.py"]
CLIP_B = ["before_tests/test_train.py", "before_tests/test_trace.py", "-k", "clip"]
CLIP_A = ["tests/test_train.py", "tests/test_trace.py", "tests/test_mutation_guards.py", "-k", "clip or threshold"]
STORE_B = ["before_tests/test_store.py"]; STORE_A = ["tests/test_store.py", "tests/test_mutation_guards.py"]
ID_B = ["before_tests/test_sweep.py", "before_tests/test_train.py", "-k", "run_id or equal or config"]
ID_A = ["tests/test_sweep.py", "tests/test_train.py", "tests/test_run_ids.py", "-k", "run_id or equal or config or ids or field or canonical"]
SWEEP_B = ["before_tests/test_sweep.py"]; SWEEP_A = ["tests/test_sweep.py", "tests/test_mutation_guards.py"]
L, T, P, C, S, R, W = "link", "tracer", "probes", "clipping", "store", "run ids", "sweeps/collect"
M = [
 ("L1", L, "experiments/linking/predict.py", "EDGE_MARGIN = 0.05", "EDGE_MARGIN = -0.05"),
 ("L2", L, "experiments/linking/core.py", 'reindex(step=probe)', 'reindex(step=probe - 1)'),
 ("L2b", L, "experiments/linking/core.py", 'lr = trace["lr"].reindex(step=probe)', 'lr = trace["lr"].shift(step=1).reindex(step=probe)'),
 ("L3", L, "experiments/linking/report.py", 'agreement_scores(np.log10(ds["pred_grad_sq_norm"])', 'agreement_scores(np.log10(ds["meas_grad_sq_norm"])'),
 ("L4", L, "experiments/linking/measure.py", "prev = norm.shift(step=1)", "prev = norm"),
 ("L5", L, "experiments/linking/measure.py", 'start = probe - window // 2 if align == "center" else probe\n', 'start = probe - window // 2 if align == "center" else probe - 1\n'),
 ("L6", L, "experiments/linking/scores.py", '"spearman": float(stats.spearmanr(', '"spearman": float(stats.pearsonr('),
 ("L7", L, "experiments/linking/predict.py", "w[0] = lam_g, lam_top / lam_g if share", "w[0] = lam_g, 1.0 if share"),
 ("L8", L, "experiments/linking/predict.py", "& (step[None, :] >= 1)", "& (step[None, :] >= 0)"),
 ("L9", L, "experiments/linking/core.py", 'h_global = lr * trace["sharpness_global"]', 'h_global = lr * trace["sharpness"].max("layer")'),
 ("L10", L, "experiments/linking/signal.py", "return corr, pred_sq + mean_sq, mean_sq", "return corr, pred_sq, mean_sq"),
 ("L11", L, "experiments/linking/core.py", "rolling(probe_step=int(smooth), center=True", "rolling(probe_step=int(smooth), center=False"),
 ("L12", L, "experiments/linking/report.py", '"meas_corr": float(np.nanmean(meas))', '"meas_corr": float(np.nanmean(pred))'),
 ("L13", L, "experiments/linking/scores.py", "abs(pred[g].mean() - meas[g].mean())", "np.abs(pred[g] - meas[g]).mean()"),
 ("L14", L, "experiments/linking/predict.py", "* (1 - edge_margin) / lr_steps", "* (1 + edge_margin) / lr_steps"),
 ("L15", L, "experiments/linking/core.py", "h_top = np.minimum(lr * trace[\"sharpness_global\"], edge * (1 - EDGE_MARGIN))", "h_top = lr * trace[\"sharpness_global\"]"),
 ("L16", L, "experiments/linking/report.py", '"h/edge": float(np.nanmedian(x["edge_ratio"]))', '"h/edge": float(np.nanmedian(x["h"]))'),
 ("T1", T, "experiments/trace/tracer.py", "dots[1:] / (norms[1:] * norms[:-1])", "dots[1:] / (norms[1:] * norms[1:])"),
 ("T2", T, "experiments/trace/tracer.py", '"grad_abs_mean": (sl, get("g_abs") / sizes)', '"grad_abs_mean": (sl, get("g_abs"))'),
 ("T3", T, "experiments/trace/tracer.py", "u_global = np.sqrt((update_norm ** 2).sum(axis=1))", "u_global = update_norm.sum(axis=1)"),
 ("T4", T, "experiments/trace/engines.py", "out = self.block[:rows].copy(), self.clip[:rows].copy()\n        self.clip[:] = 1.0", "out = self.block[:rows].copy(), self.clip[:rows].copy()"),
 ("T5", T, "experiments/trace/engines.py", "a.index_fill_(0, self.pad_index, math.inf)", "a.index_fill_(0, self.pad_index, 0.0)"),
 ("T6", T, "experiments/trace/tracer.py", 'grad_cos_global = _successive_cos(get("g_dot").sum(axis=1), g_global)', 'grad_cos_global = _successive_cos(get("g_dot").sum(axis=1), grad_norm.sum(axis=1))'),
 ("T7", T, "experiments/trace/tracer.py", 'ratio = np.log10(get("d_abs") / get("p_abs"))', 'ratio = np.log10(get("d_abs") / get("p_abs") / sizes)'),
 ("T8", T, "experiments/trace/engines.py", "row[l], row[L + l], row[2 * L + l] = dot(d, d), asum(d), dot(d, D[prev, s:s + m])", "row[l], row[L + l], row[2 * L + l] = dot(d, d), asum(d), dot(d, D[cur, s:s + m])"),
 ("P1", P, "experiments/trace/probes.py", "unbiased_sq = rows.mean(0) ** 2 - var / parts", "unbiased_sq = rows.mean(0) ** 2"),
 ("P2", P, "experiments/trace/probes.py", "per_block(var) * (b / (noise_batch_size or B))", "per_block(var) * (b / B)"),
 ("P3", P, "experiments/trace/probes.py", "var = rows.var(dim=0, correction=1)", "var = rows.var(dim=0, correction=0)"),
 ("P4", P, "experiments/trace/probes.py", "top.append(c.mean() ** 2 - c.var(correction=1) / parts)", "top.append(c.mean() ** 2)"),
 ("C1", C, "experiments/runs/optim.py", "factor = torch.clamp(value / (raw_global + 1e-6), max=1.0)", "factor = value / (raw_global + 1e-6)"),
 ("C2", C, "experiments/runs/optim.py", "factors[name] = torch.clamp(value / (raw[name] + 1e-6), max=1.0)", "factors[name] = value / (raw[name] + 1e-6)"),
 ("C3", C, "experiments/runs/optim.py", "new / torch.where(old > 0, old, 1.0), torch.ones_like(old))", "new / torch.where(old > 0, old, 1.0), torch.zeros_like(old))"),
 ("C4", C, "experiments/runs/optim.py", "get_total_norm([factors[n] * raw[n] for n in params])", "get_total_norm([raw[n] for n in params])"),
 ("S1", S, "experiments/store.py", 'prefix=".tmp-", dir=path.parent', 'prefix=".tmp-"'),
 ("S2", S, "experiments/store.py", '    atomic_write_json(run_dir / SUMMARY, summary)\n    (run_dir / FAILED).unlink(missing_ok=True)\n    atomic_write_text(run_dir / DONE, "")', '    atomic_write_text(run_dir / DONE, "")\n    atomic_write_json(run_dir / SUMMARY, summary)\n    (run_dir / FAILED).unlink(missing_ok=True)'),
 ("S3", S, "experiments/store.py", "return (Path(run_dir) / FAILED).exists() and not is_done(run_dir)", "return (Path(run_dir) / FAILED).exists()"),
 ("S4", S, "experiments/store.py", "    (run_dir / FAILED).unlink(missing_ok=True)\n", ""),
 ("S5", S, "experiments/store.py", "parents=True, exist_ok=True", "exist_ok=True"),
 ("S6", S, "experiments/store.py", 'json.dumps(obj, indent=2, sort_keys=True,', 'json.dumps(obj, indent=2, sort_keys=False,'),
 ("R1", R, "experiments/runs/config.py", "    for key in others:\n        out[key] = canonical_value(out[key])\n    return out", "    for key in others:\n        out[key] = canonical_value(out[key])\n    out.pop(\"data_args\")\n    return out"),
 ("R2", R, "experiments/runs/config.py", 'f"optdyn-result-format-{RESULT_FORMAT}\\n{text}"', 'f"optdyn-result-format-\\n{text}"'),
 ("R3", R, "experiments/runs/config.py", 'object.__setattr__(self, "momentum", 0.0)', 'pass'),
 ("R4", R, "experiments/runs/config.py", "out[key] = value + 0.0 if math.isfinite(value) else repr(value)  # -0.0 + 0.0 == 0.0", "out[key] = value if math.isfinite(value) else repr(value)"),
 ("R5", R, "experiments/runs/config.py", "separators=(\",\", \":\"), allow_nan=False)", "separators=(\",\", \":\"), allow_nan=False)[:-40]"),
 ("W1", W, "experiments/sweeps/runner.py", 'if exists(f"{prefix}{rid}/{store.DONE}"):', 'if exists(f"{prefix}{rid}/{store.CONFIG}"):'),
 ("W2", W, "experiments/sweeps/runner.py", 'todo_status = ("todo", "failed") if retry_failed else ("todo",)', 'todo_status = ("todo", "failed")'),
 ("W3", W, "experiments/sweeps/spec.py", "return list({rid: (config, rid) for _, config, rid in spec.points}.values())", "return [(config, rid) for _, config, rid in spec.points]"),
 ("W4", W, "experiments/sweeps/collect.py", "if store.is_done(root / rid) and (run_ids is None or rid in run_ids)]", "if (root / rid).is_dir() and (run_ids is None or rid in run_ids)]"),
 ("W5", W, "experiments/sweeps/collect.py", "id_grid[index] = rid if rid in finished else \"\"", "id_grid[index] = rid"),
 ("W6", W, "experiments/sweeps/runner.py", '"failed": 0 if retry_failed else the_plan.status.count("failed"),', '"failed": 0,'),
]
TESTS = {L: (LINK_B, LINK_A), T: (TRACE_B, TRACE_A), P: (PROBE_B, PROBE_A), C: (CLIP_B, CLIP_A), S: (STORE_B, STORE_A),
         R: (ID_B, ID_A), W: (SWEEP_B, SWEEP_A)}
