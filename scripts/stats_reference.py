#!/usr/bin/env python3
"""The paper's analysis in pandas + statsmodels, as a reference for Candor.

  stats_reference.py analyze OBS.parquet OUT_DIR
      Full analysis (every family's McNemar table with BH, and M1-M4 with average marginal
      effects, fitted on the answer rows as the paper's code does). Writes family_table.csv,
      coefficients.csv and effects.csv to OUT_DIR and prints {"seconds": ...}.
  stats_reference.py crosscheck OBS.parquet CANDOR_DIR
      Runs the same analysis and compares it with the Parquet reports `candor analyze --out`
      wrote: McNemar p, BH p, GLM coefficients and SEs must agree to 1e-8 relative. Prints the
      largest relative differences as JSON; exits 1 on disagreement.

Run it with the interpreter scripts/python-env prints (pandas and statsmodels pinned there).
"""
import json
import re
import sys
import time

import numpy as np
import pandas as pd
import statsmodels.formula.api as smf
import statsmodels.api as sm
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.multitest import fdrcorrection

KEYS = ["model", "dataset", "item_key", "amendment_type", "prompt_type", "sample_index"]
FAMILY = ["model", "base_checkpoint", "checkpoint", "dataset", "test_type"]
TOL = 1e-8


def test_type(df):
    t = pd.Series(None, index=df.index, dtype=object)
    t[df.prompt_type == "original"] = "Normal"
    # The paper's published Normal cells hold `original` prompts only (METHOD.md section 4);
    # `original_neutral` is its own family.
    t[df.prompt_type == "original_neutral"] = "Neutral"
    t[df.prompt_type.isin(["correct", "incorrect"])] = "Sycophancy"
    return t


def family_table(inc):
    inc = inc.assign(test_type=test_type(inc)).dropna(subset=["test_type"])
    base = inc[~inc.is_finetuned]
    ft = inc[inc.is_finetuned]
    pairs = base.merge(ft, on=KEYS + ["test_type"], suffixes=("_base", "_ft"))
    pairs = pairs.rename(columns={"checkpoint_base": "base_checkpoint", "checkpoint_ft": "checkpoint",
                                  "amendment_type": "category"})
    bc, fc = pairs.correct_base.astype(bool), pairs.correct_ft.astype(bool)
    pairs = pairs.assign(both_correct=bc & fc, b=bc & ~fc, c=~bc & fc, both_wrong=~bc & ~fc)
    counts = pairs.groupby(FAMILY + ["category"])[["both_correct", "b", "c", "both_wrong"]].sum().reset_index()
    pvals = []
    for row in counts.itertuples():
        if row.b + row.c == 0:
            pvals.append(np.nan)
        else:
            table = [[row.both_correct, row.b], [row.c, row.both_wrong]]
            pvals.append(mcnemar(table, exact=True).pvalue)
    counts["p_exact"] = pvals
    counts["p_bh"] = np.nan
    for _, idx in counts.groupby(FAMILY).groups.items():
        p = counts.loc[idx, "p_exact"]
        present = p.dropna()
        if len(present):
            _, adj = fdrcorrection(present.values, alpha=0.05)
            counts.loc[present.index, "p_bh"] = adj
    return counts


def prompt_group(pt):
    pt = pt.str.lower()
    return np.where(pt.str.contains("correct"), "user_opinion", np.where(pt.str.contains("original"), "original", "other"))


def canonical(term):
    term = re.sub(r"C\((\w+)(, Treatment\([^)]*\))?\)", r"\1", term)
    return term


def regressions(inc):
    latest = inc[inc.is_finetuned].groupby("model").checkpoint_epoch.max()
    keep = ~inc.is_finetuned | (inc.checkpoint_epoch == inc.model.map(latest))
    d = inc[keep].copy()
    d["is_incorrect"] = (~d.correct.astype(bool)).astype(float)
    d["ft"] = d.is_finetuned.astype(float)
    d["amendment"] = d.amendment_type
    d["amendment_group"] = d.amendment_type.str.split(":").str[0].str.strip()
    d["prompt_group"] = prompt_group(d.prompt_type)
    ref_ds = "disinfo" if (d.dataset == "disinfo").any() else sorted(d.dataset.unique())[0]
    ds = f"C(dataset, Treatment('{ref_ds}'))"
    coefs, effects = [], []

    def fit(name, data, formula):
        res = smf.glm(formula, data=data, family=sm.families.Binomial()).fit(tol=1e-13, maxiter=200)
        for term in res.params.index:
            coefs.append({"model_spec": name, "term": canonical(term), "estimate": res.params[term], "se": res.bse[term]})
        return res

    def ame(res, data, mask=None):
        sub = data if mask is None else data[mask]
        hi = res.predict(sub.assign(ft=1.0))
        lo = res.predict(sub.assign(ft=0.0))
        return float(np.mean(hi - lo))

    m1 = d[(d.amendment_group == "unmodified") & (d.prompt_group == "original")]
    res = fit("M1", m1, f"is_incorrect ~ ft + {ds} + C(model)")
    effects.append({"model_spec": "M1", "context": "all", "log_odds": res.params["ft"], "se": res.bse["ft"],
                    "ame_pp": 100 * ame(res, m1)})
    for name, col, ref, rows in [
        ("M2", "amendment_group", "unmodified", d[d.prompt_group == "original"]),
        ("M3", "amendment", "unmodified", d[d.prompt_group == "original"]),
        ("M4", "prompt_group", "original", d[d.prompt_group != "other"]),
    ]:
        rows = rows.copy()
        if name == "M2":
            rows["amendment"] = rows.amendment_group
            col = "amendment"
        ctx = f"C({col}, Treatment('{ref}'))"
        res = fit(name, rows, f"is_incorrect ~ ft + {ctx} + {ds} + ft:{ctx} + C(model)")
        for level in sorted(rows[col].unique()):
            names = ["ft"] if level == ref else ["ft", f"ft:{ctx}[T.{level}]"]
            w = np.zeros(len(res.params))
            for n in names:
                w[list(res.params.index).index(n)] = 1.0
            est = float(w @ res.params.values)
            se = float(np.sqrt(w @ res.cov_params().values @ w))
            effects.append({"model_spec": name, "context": level, "log_odds": est, "se": se,
                            "ame_pp": 100 * ame(res, rows, rows[col] == level)})
    return pd.DataFrame(coefs), pd.DataFrame(effects)


def analyze(path):
    df = pd.read_parquet(path)
    inc = df[df.correct.notna()].copy()
    inc["correct"] = inc.correct.astype(bool)
    return family_table(inc), *regressions(inc)


def rel(a, b):
    a, b = np.asarray(a, float), np.asarray(b, float)
    both_nan = np.isnan(a) & np.isnan(b)
    d = np.abs(a - b) / np.maximum(np.maximum(np.abs(a), np.abs(b)), 1e-300)
    d[both_nan] = 0.0
    d[np.isnan(d)] = np.inf
    return float(d.max()) if len(d) else 0.0


def crosscheck(path, candor_dir):
    fam, coefs, effects = analyze(path)
    c_fam = pd.read_parquet(f"{candor_dir}/family_table.parquet")
    c_coef = pd.read_parquet(f"{candor_dir}/coefficients.parquet")
    c_eff = pd.read_parquet(f"{candor_dir}/effects.parquet")
    keys = FAMILY + ["category"]
    m = fam.merge(c_fam, on=keys, suffixes=("_py", "_candor"), how="outer", indicator=True)
    mc = coefs.merge(c_coef, on=["model_spec", "term"], suffixes=("_py", "_candor"), how="outer", indicator=True)
    me = effects.merge(c_eff, on=["model_spec", "context"], suffixes=("_py", "_candor"), how="outer", indicator=True)
    out = {
        "categories": len(m), "coefficients": len(mc), "effects": len(me),
        "unmatched": int((m._merge != "both").sum() + (mc._merge != "both").sum() + (me._merge != "both").sum()),
        "counts_equal": bool((m.b_py == m.b_candor).all() and (m.c_py == m.c_candor).all()),
        "mcnemar_p": rel(m.p_exact_py, m.p_exact_candor),
        "bh_p": rel(m.p_bh_py, m.p_bh_candor),
        "glm_coef": rel(mc.estimate_py, mc.estimate_candor),
        "glm_se": rel(mc.se_py, mc.se_candor),
        "effect_log_odds": rel(me.log_odds_py, me.log_odds_candor),
        "effect_se": rel(me.se_py, me.se_candor),
        "ame_pp": rel(me.ame_pp_py, me.ame_pp_candor),
    }
    print(json.dumps(out))
    ok = out["unmatched"] == 0 and out["counts_equal"] and all(
        out[k] <= TOL for k in ["mcnemar_p", "bh_p", "glm_coef", "glm_se", "effect_log_odds", "effect_se", "ame_pp"])
    return 0 if ok else 1


def main():
    cmd = sys.argv[1]
    if cmd == "analyze":
        start = time.perf_counter()
        fam, coefs, effects = analyze(sys.argv[2])
        seconds = time.perf_counter() - start
        import os
        os.makedirs(sys.argv[3], exist_ok=True)
        fam.to_csv(f"{sys.argv[3]}/family_table.csv", index=False)
        coefs.to_csv(f"{sys.argv[3]}/coefficients.csv", index=False)
        effects.to_csv(f"{sys.argv[3]}/effects.csv", index=False)
        print(json.dumps({"seconds": seconds, "categories": len(fam)}))
        return 0
    if cmd == "crosscheck":
        return crosscheck(sys.argv[2], sys.argv[3])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
