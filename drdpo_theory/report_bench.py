"""Generated text of paper_repro.md's benchmark sections (solver speed, train-step cost, cost against TRL).

The benchmark scripts in ``benchmarks/`` print their tables and, with ``--json PATH``, write them as
one JSON document; ``drdpo reproduce --collect`` copies those documents from ``results/bench/`` to
``docs/results/bench/`` and the functions here render paper_repro.md's blocks and summary rows from
the committed copies (see :mod:`drdpo_theory.report`). A benchmark whose JSON is not committed renders
as *not regenerated in this checkout*, with the command that would produce it.

Ratios are recomputed here from the rows (times, memory); the goals a script printed are checked
against the recomputed ones by the tests, so a document cannot quote a verdict its numbers do not
support.
"""

from __future__ import annotations

import math

#: benchmark -> (file under docs/results/bench/, command that writes it under results/bench/)
BENCH = {
    "bench-solvers": ("solvers.json", "python benchmarks/solvers.py --json results/bench/solvers.json"),
    "bench-train-step": ("train_step.json",
                         "python benchmarks/train_step.py --threads 1 --json results/bench/train_step.json"),
    "bench-vs-trl": ("vs_trl_smollm2.json",
                     "python benchmarks/vs_trl.py --model smollm2 --steps 10 --json results/bench/vs_trl_smollm2.json"),
    # the configurations the goals compare, 2 rounds interleaved (a drifting shared machine hits all alike)
    "bench-vs-trl-rounds": ("vs_trl_smollm2_rounds.json",
                            "python benchmarks/vs_trl.py --model smollm2 --steps 10 --rounds 2 --configs trl-dpo "
                            "trl-wdpo trl-wdpo-fulllogits align-dpo align-kldpo align-wdpo trl-dpo-lora trl-wdpo-lora "
                            "trl-wdpo-fulllogits-lora align-dpo-lora align-kldpo-lora align-wdpo-lora "
                            "--json results/bench/vs_trl_smollm2_rounds.json"),
}

NOT_REGENERATED = "not regenerated in this checkout"


def _load(r, bench: str):
    return r.json(f"bench/{BENCH[bench][0]}")


def _missing(bench: str) -> str:
    return (f"*{NOT_REGENERATED}*: no committed summary of this benchmark (`{BENCH[bench][1]}`, then "
            f"`drdpo reproduce --collect --only {bench}`).")


def _src(r, bench: str) -> str:
    m = r.manifest(bench)
    when = f" (collected {m['collected']} at commit {m['commit']})" if m.get("commit") else ""
    return f"`docs/results/bench/{BENCH[bench][0]}`{when}"


def _goal_lines(goals: list[dict]) -> list[str]:
    return [f"    [{'met' if g['met'] else 'MISSED'}] {g['goal']}: {g['value']}" for g in goals]


def _missed(goals: list[dict]) -> str:
    """" (missed: goal value; ...)" for the goals not met, "" when every one is."""
    miss = [g for g in goals if not g["met"]]
    return f" (missed: {'; '.join(g['goal'] + ' ' + g['value'] for g in miss)})" if miss else ""


def _x(v, spec=".2f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _secs(v) -> str:
    if v is None:
        return "-"
    return f"{v:.3f} s" if v >= 0.01 else f"{v * 1e3:.2f} ms"


# ------------------------------------------------------------------------------------ vs TRL (section 12)
def _ok(r: dict) -> bool:
    return "error" not in r and r.get("s_per_step") is not None


def trl_ratios(rows: list[dict]) -> dict[str, dict]:
    """Per configuration: s/step ratio to TRL DPO (same mode) and to the same path's DPO, recomputed."""
    by = {r["config"]: r for r in rows if _ok(r)}
    out = {}
    for name, r in by.items():
        sfx = "-lora" if name.endswith("-lora") else ""
        path = name.split("-")[0]
        trl, own = by.get("trl-dpo" + sfx), by.get(f"{path}-dpo{sfx}")
        out[name] = {"vs_trl_dpo": r["s_per_step"] / trl["s_per_step"] if trl else None,
                     "vs_path_dpo": r["s_per_step"] / own["s_per_step"] if own else None}
    return out


def trl_goals(rows: list[dict]) -> list[dict]:
    """The CPU goals of the vs-TRL benchmark, decided from the rows (goal, value, met)."""
    by = {r["config"]: r for r in rows if _ok(r)}
    goals = []

    def add(goal, value, met):
        goals.append({"goal": goal, "value": value, "met": bool(met)})

    for sfx, tag in (("", "full"), ("-lora", "LoRA")):
        trl = by.get("trl-dpo" + sfx)
        for m in ("dpo", "kldpo"):
            r = by.get(f"align-{m}{sfx}")
            if trl and r:
                x = r["s_per_step"] / trl["s_per_step"]
                add(f"drdpo align {m.upper()} ({tag}) <= 0.90x TRL DPO s/step", f"{x:.2f}x", x <= 0.90)
                if r.get("peak_rss_mib") and trl.get("peak_rss_mib"):
                    add(f"drdpo align {m.upper()} ({tag}) peak RSS <= TRL DPO's",
                        f"{r['peak_rss_mib']:.0f} vs {trl['peak_rss_mib']:.0f} MiB", r["peak_rss_mib"] <= trl["peak_rss_mib"])
        aw = by.get("align-wdpo" + sfx)
        for cfg, head in (("trl-wdpo", ", lm_head='fused'"), ("trl-wdpo-fulllogits", ", lm_head='full'"),
                          ("trl-wdpo-chunk2", ", fd_pass2_chunks=2")):
            tw = by.get(cfg + sfx)
            if tw and aw:
                x = tw["s_per_step"] / aw["s_per_step"]
                add(f"TRL adapter WDPO{head} ({tag}) <= 1.05x drdpo align WDPO s/step", f"{x:.2f}x", x <= 1.05)
            if tw and trl and tw.get("peak_rss_mib") and trl.get("peak_rss_mib"):
                x = tw["peak_rss_mib"] / trl["peak_rss_mib"]
                add(f"TRL adapter WDPO{head} ({tag}) peak RSS <= 1.12x TRL DPO's", f"{x:.2f}x", x <= 1.12)
        for p in ("trl", "align"):
            for var, what in (("", ""), ("-chunk2", ", 2 chunks")):
                w, dpo = by.get(f"{p}-wdpo{var}{sfx}"), by.get(f"{p}-dpo{sfx}")
                if w and dpo:
                    x = w["s_per_step"] / dpo["s_per_step"]
                    add(f"{p} WDPO finite-diff{what} ({tag}) <= 2.0x {p} DPO s/step", f"{x:.2f}x", x <= 2.0)
    return goals


def block_vs_trl(r, bench: str = "bench-vs-trl") -> str:
    d = _load(r, bench)
    if d is None:
        return _missing(bench)
    rows = d["rows"]
    ratios = trl_ratios(rows)
    head = ["path", "s/step" + (" (each round's median)" if d.get("rounds", 1) > 1 else ""), "s/1k padded tok",
            "vs TRL DPO", "vs path DPO", "tok/step", "peak RSS (train)", "peak RSS (process)"]
    out = [f"{d['model']}, {d['dtype']}, {d['threads']} torch thread(s), {d['batch_size']} pairs/step, max_length "
           f"{d['max_length']}, {d['steps']} steps per configuration (median of steps {d['warmup'] + 1}-{d['steps']}"
           + (f", pooled over {d['rounds']} interleaved rounds" if d.get("rounds", 1) > 1 else "") + "), "
           f"TRL {d.get('trl_version') or '-'}, {d.get('cpu', '?')}, 1-minute load average "
           f"{d['load_avg_before']:.1f} at the start and {d['load_avg_after']:.1f} at the end; "
           f"{_src(r, bench)}:", "",
           f"    {d['command']}", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        if not _ok(row):
            out.append(f"| {row['path']} | failed (exit {row.get('returncode')}) |" + " |" * (len(head) - 2))
            continue
        q = ratios[row["config"]]
        per_round = row.get("s_per_step_rounds")
        step = _x(row["s_per_step"], ".3f") + (f" ({', '.join(f'{v:.2f}' for v in per_round)})" if per_round else "")
        out.append("| " + " | ".join([
            row["path"], step, _x(row.get("s_per_1k_padded_tokens"), ".3f"),
            _x(q["vs_trl_dpo"]), _x(q["vs_path_dpo"]), _x(row.get("padded_tokens_per_step"), ".0f"),
            _x(row.get("peak_rss_mib"), ".0f") + " MiB", _x(row.get("process_peak_rss_mib"), ".0f") + " MiB"]) + " |")
    goals = trl_goals(rows)
    met = sum(g["met"] for g in goals)
    out += ["", f"Goals decided by this run ({met} of {len(goals)} met):", ""]
    out += _goal_lines(goals)
    return "\n".join(out)


def row_vs_trl(r) -> str:
    d = _load(r, "bench-vs-trl")
    cmd = f"`{BENCH['bench-vs-trl'][1]}`"
    if d is None:
        return f"| 12 | train-step cost against TRL | - | {NOT_REGENERATED} | {cmd} | section 12 |"
    rows = d["rows"]
    q = trl_ratios(rows)
    goals = trl_goals(rows)
    by = {x["config"]: x for x in rows if _ok(x)}

    def rat(a, b):
        return f"{by[a]['s_per_step'] / by[b]['s_per_step']:.2f}x" if a in by and b in by else "-"

    txt = (f"{d['model']}, CPU, 1 thread: `drdpo align` DPO / KLDPO {_x(q.get('align-dpo', {}).get('vs_trl_dpo'))}x / "
           f"{_x(q.get('align-kldpo', {}).get('vs_trl_dpo'))}x TRL DPO s/step (LoRA "
           f"{_x(q.get('align-dpo-lora', {}).get('vs_trl_dpo'))}x / {_x(q.get('align-kldpo-lora', {}).get('vs_trl_dpo'))}x); "
           f"TRL adapter WDPO through TRL's fused head {rat('trl-wdpo', 'align-wdpo')} (LoRA "
           f"{rat('trl-wdpo-lora', 'align-wdpo-lora')}) `drdpo align` WDPO"
           + (f", with `lm_head='full'` {rat('trl-wdpo-fulllogits', 'align-wdpo')} (LoRA "
              f"{rat('trl-wdpo-fulllogits-lora', 'align-wdpo-lora')})" if "trl-wdpo-fulllogits" in by else "")
           + f"; {sum(g['met'] for g in goals)} of {len(goals)} goals met" + _missed(goals))
    rd = _load(r, "bench-vs-trl-rounds")
    if rd is not None:
        rg = trl_goals(rd["rows"])
        txt += (f"; over {rd.get('rounds', 1)} interleaved rounds of the goal configurations: "
                f"{sum(g['met'] for g in rg)} of {len(rg)} goals met" + _missed(rg))
        cmd += f", `{BENCH['bench-vs-trl-rounds'][1]}`"
        # the adapter's WDPO through each log-prob path, pooled over the rounds
        hb = {x["config"]: x["s_per_step"] for x in rd["rows"] if _ok(x)}
        heads = [f"{tag} {hb['trl-wdpo-fulllogits' + sfx] / hb['align-wdpo' + sfx]:.2f}x with `lm_head='full'` (the "
                 f"default on CPU), {hb['trl-wdpo' + sfx] / hb['align-wdpo' + sfx]:.2f}x through TRL's fused head"
                 for sfx, tag in (("", "full fine-tuning"), ("-lora", "LoRA"))
                 if {"trl-wdpo" + sfx, "trl-wdpo-fulllogits" + sfx, "align-wdpo" + sfx} <= set(hb)]
        if heads:
            txt += "; over the rounds, TRL adapter WDPO vs `drdpo align` WDPO s/step: " + "; ".join(heads)
    return f"| 12 | train-step cost against TRL | - | {txt} | {cmd} | section 12, {_src(r, 'bench-vs-trl')} |"


# ------------------------------------------------------------------------------------ train step (section 11)
def block_train_step(r) -> str:
    d = _load(r, "bench-train-step")
    if d is None:
        return _missing("bench-train-step")
    rows = d["rows"]
    ref = rows[0]
    cfg = d.get("config", {})
    out = [f"{d.get('device', '?')}, torch {d.get('torch', '?')}, {cfg.get('dtype', '?')}, {d['n_params'] / 1e6:.2f}M "
           f"parameters, {cfg.get('pairs', '?')} pairs x {cfg.get('seq_len', '?')} tokens, median of "
           f"{cfg.get('steps', '?')} steps, 1-minute load average {_x(d.get('load_avg_before'), '.1f')} -> "
           f"{_x(d.get('load_avg_after'), '.1f')}; memory: {d.get('memory_kind', '?')}; {_src(r, 'bench-train-step')}:", "",
           f"    {BENCH['bench-train-step'][1]}", "",
           "| method | attention | step (wall) | x DPO | CPU x DPO | peak memory x DPO | allocated x DPO | "
           "saved for backward x DPO |",
           "|---|---|---|---|---|---|---|---|"]
    for x in rows:
        out.append(f"| {x['method']} | {x['attn']} | {_secs(x['step_s'])} | {x['step_s'] / ref['step_s']:.2f} | "
                   f"{x['cpu_s'] / ref['cpu_s']:.2f} | {x['peak_bytes'] / ref['peak_bytes']:.2f} | "
                   f"{x['alloc_bytes'] / ref['alloc_bytes']:.2f} | {x['saved_bytes'] / ref['saved_bytes']:.2f} |")
    out += ["", f"Gradient cosine to double backward: finite-diff two-pass {d['cos_fd_db']:.6f} (penalty part "
                f"{d['cos_fd_db_penalty']:.6f}); finite-diff surrogate {d['cos_fd_surrogate_db']:.6f}."]
    return "\n".join(out)


def _train_rows(d) -> dict[str, dict]:
    return {x["method"]: x for x in d["rows"]}


def row_train_step(r) -> str:
    d = _load(r, "bench-train-step")
    cmd = f"`{BENCH['bench-train-step'][1]}`"
    if d is None:
        return f"| 11 | LLM training step cost | - | {NOT_REGENERATED} | {cmd} | section 11 |"
    by = _train_rows(d)
    ref = d["rows"][0]

    def t(m):
        m = next((k for k in by if k == m or k.startswith(m + " (")), m)
        return (f"{by[m]['step_s'] / ref['step_s']:.2f}x (CPU {by[m]['cpu_s'] / ref['cpu_s']:.2f}x)"
                if m in by else "-")

    def mem(m):
        return f"{by[m]['alloc_bytes'] / ref['alloc_bytes']:.2f}x" if m in by else "-"

    txt = (f"{d.get('device', 'CPU')}, tiny random Llama: time / allocated memory vs DPO: KLDPO {t('KLDPO')}; WDPO "
           f"finite-diff (two-pass) {t('WDPO fd two-pass')} / {mem('WDPO fd two-pass')}; double backward "
           f"{t('WDPO double-backward')} / {mem('WDPO double-backward')}; finite-diff vs double-backward gradient "
           f"cosine {d['cos_fd_db']:.6f}")
    return f"| 11 | LLM training step cost | - | {txt} | {cmd} | section 11, {_src(r, 'bench-train-step')} |"


# ------------------------------------------------------------------------------------ solvers (section 2)
def _speed_rows(d) -> list[dict]:
    return [x for x in d["rows"] if x.get("native_s") is not None]


def block_solvers(r) -> str:
    d = _load(r, "bench-solvers")
    if d is None:
        return _missing("bench-solvers")
    out = [f"{d.get('machine', '?')}, {d.get('date', '?')}, commit {d.get('commit', '?')}, 1-minute load average "
           f"{_x(d.get('load_avg_before'), '.1f')} -> {_x(d.get('load_avg_after'), '.1f')}; "
           f"{_src(r, 'bench-solvers')}; wall time with CPU time in brackets, native: best of "
           f"{d.get('native_repeats', '?')} runs; d = {d.get('d', '?')}, beta = {_x(d.get('beta'), 'g')}, KL and chi2 "
           f"rho = {_x(d.get('rho'), 'g')}, W1 eps = {_x(d.get('eps'), 'g')} (kappa = inf for `wdpo`, "
           f"{_x(d.get('kappa'), 'g')} for `wdpo-k1`), CVaR alpha = {_x(d.get('alpha'), 'g')}, ball B = "
           f"{_x(d.get('B'), 'g')}:", "",
           f"    {d.get('command', BENCH['bench-solvers'][1])}", "",
           "| problem | n | native | cvxpy | cvxpy / native | d_obj cvxpy | dro | dro / native | d_obj dro | native gap |",
           "|---|---|---|---|---|---|---|---|---|---|"]

    def cell(w, c):
        return "-" if w is None else f"{_secs(w)} ({_secs(c)})" if c is not None else _secs(w)

    def ratio(a, b):
        return "-" if a is None or b is None or b <= 0 else f"{a / b:.0f}x"

    for x in d["rows"]:
        if x.get("native_s") is None:
            continue
        cv = x.get("cvxpy_s")
        dr = x.get("dro_s")
        out.append(" | ".join([
            f"| {x['problem']}", f"{x['n']:.0e}".replace("e+0", "e"), cell(x["native_s"], x.get("native_cpu_s")),
            cell(cv, x.get("cvxpy_cpu_s")) if cv is not None else (x.get("cvxpy_error") or "-"),
            ratio(cv, x["native_s"]), _x(x.get("d_obj_cvxpy"), ".1e"),
            cell(dr, x.get("dro_cpu_s")) if dr is not None else (x.get("dro_error") or "-"),
            ratio(dr, x["native_s"]), _x(x.get("d_obj_dro"), ".1e"), _x(x.get("native_gap"), ".1e")]) + " |")
    goals = d.get("goals") or []
    if goals:
        out += ["", "Goals decided by this run:", ""]
        out += _goal_lines(goals)
    return "\n".join(out)


def row_solvers(r) -> str:
    d = _load(r, "bench-solvers")
    cmd = f"`{BENCH['bench-solvers'][1]}`"
    if d is None:
        return f"| 2 | solver speed | - | {NOT_REGENERATED} | {cmd} | section 2 |"
    rows = _speed_rows(d)
    largest = {}
    for x in rows:
        largest[x["problem"]] = max(largest.get(x["problem"], 0), x["n"])
    parts = []
    for x in rows:
        if x["n"] != largest[x["problem"]]:
            continue
        s = f"{x['problem']} at n = {x['n']:.0e}: native {_secs(x['native_s'])}".replace("e+0", "e")
        if x.get("cvxpy_s") is not None:
            s += f", {x['cvxpy_s'] / x['native_s']:.0f}x faster than cvxpy"
        if x.get("dro_s") is not None:
            s += f", {x['dro_s'] / x['native_s']:.0f}x faster than `dro`"
        parts.append(s)
    return f"| 2 | solver speed | - | {'; '.join(parts)} (d = {d.get('d', 8)}) | {cmd} | section 2, {_src(r, 'bench-solvers')} |"
