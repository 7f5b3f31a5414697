// Candor report drill-down: the items behind a family-table cell (see src/report/drill.rs).
// The data block is decompressed on the first click only; a cell renders 50 pairs per side
// at a time, so reports with tens of thousands of pairs stay responsive.
(function () {
  "use strict";
  const PAGE = 50;
  let data = null;
  let loading = null;
  const state = { cmp: 0, dataset: "", test: "", category: "", prompt: "", side: "", shown: { 0: PAGE, 1: PAGE } };
  const panel = document.getElementById("drill");

  function text(i) {
    return i < 0 ? null : data.strings[i];
  }

  async function load() {
    if (data) return data;
    if (!loading) {
      loading = (async () => {
        const b64 = document.getElementById("drill-data").textContent.trim();
        const bytes = await (await fetch("data:application/octet-stream;base64," + b64)).arrayBuffer();
        const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("gzip"));
        data = JSON.parse(await new Response(stream).text());
        return data;
      })();
    }
    return loading;
  }

  function el(tag, attrs, children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "text") e.textContent = v;
      else e.setAttribute(k, v);
    }
    for (const c of children || []) if (c) e.appendChild(c);
    return e;
  }

  // Rows of the current comparison passing every filter but `skip` (for the filters' options).
  function rows(skip) {
    const c = data.cols;
    const out = [];
    for (let i = 0; i < data.n; i++) {
      if (c.comparison[i] !== state.cmp) continue;
      if (skip !== "dataset" && state.dataset && text(c.dataset[i]) !== state.dataset) continue;
      if (skip !== "test" && state.test && text(c.test_type[i]) !== state.test) continue;
      if (skip !== "category" && state.category && text(c.category[i]) !== state.category) continue;
      if (skip !== "prompt" && state.prompt && text(c.prompt_type[i]) !== state.prompt) continue;
      if (skip !== "side" && state.side !== "" && c.side[i] !== Number(state.side)) continue;
      out.push(i);
    }
    return out;
  }

  function select(name, label, col, current) {
    const values = new Set();
    for (const i of rows(name)) values.add(col === "side" ? String(data.cols.side[i]) : text(data.cols[col][i]));
    const s = el("select", { "data-filter": name, "aria-label": label });
    s.appendChild(el("option", { value: "", text: "all" }));
    for (const v of [...values].sort()) {
      const shown = col === "side" ? (v === "0" ? "b" : "c") : v;
      const o = el("option", { value: v, text: shown });
      if (v === current) o.selected = true;
      s.appendChild(o);
    }
    s.addEventListener("change", () => {
      state[name] = s.value;
      state.shown = { 0: PAGE, 1: PAGE };
      render();
    });
    return el("label", {}, [el("span", { text: label + " " }), s]);
  }

  function answer(i, who, cmp) {
    const c = data.cols;
    const verdict = text(c[who + "_verdict"][i]) || "–";
    const refusal = c[who + "_refusal"][i] ? " · refusal" : "";
    const output = text(c[who + "_output"][i]);
    const judge = text(c[who + "_judge"][i]);
    const raw = text(c[who + "_judge_raw"][i]);
    const right = (who === "base") === (c.side[i] === 0);
    return el("div", { class: "answer " + (right ? "right" : "wrong") }, [
      el("h5", { text: who === "base" ? "original (" + cmp.base + ")" : cmp.label === cmp.checkpoint ? cmp.label : cmp.label + " (" + cmp.checkpoint + ")" }),
      el("pre", { class: "output", text: output === null ? "(answer text not in this archive)" : output }),
      el("div", { class: "verdict", text: "verdict: " + verdict + refusal }),
      el("div", { class: "judge", text: "judge: " + (judge || "–") }),
      raw ? el("pre", { class: "rationale", text: raw }) : null,
    ]);
  }

  function pair(i, cmp) {
    const c = data.cols;
    const side = c.side[i] === 0 ? "b" : "c";
    const head = [side, text(c.dataset[i]), text(c.item_key[i]), text(c.category[i]), text(c.prompt_type[i]),
      "sample " + text(c.sample_index[i])].join(" · ");
    const prompt = text(c.prompt[i]);
    return el("article", {
      class: "pair", "data-side": side, "data-base-key": text(c.base_response_key[i]),
      "data-ft-key": text(c.ft_response_key[i]),
    }, [
      el("header", { text: head }),
      el("pre", { class: "prompt", text: prompt === null ? "(prompt not in this archive)" : prompt }),
      el("div", { class: "answers" }, [answer(i, "base", cmp), answer(i, "ft", cmp)]),
    ]);
  }

  function render() {
    const cmp = data.comparisons[state.cmp];
    const body = panel.querySelector(".drill-body");
    body.replaceChildren();
    const named = cmp.label === cmp.checkpoint ? cmp.label : cmp.label + " (" + cmp.checkpoint + ")";
    panel.querySelector(".drill-title").textContent = cmp.model + " — " + named + " vs " + cmp.base;
    const filters = el("div", { class: "filters" }, [
      select("dataset", "dataset", "dataset", state.dataset),
      select("test", "test", "test_type", state.test),
      select("category", "category", "category", state.category),
      select("prompt", "prompt type", "prompt_type", state.prompt),
      select("side", "b/c", "side", state.side),
    ]);
    body.appendChild(filters);
    const all = rows(null);
    const bySide = { 0: all.filter((i) => data.cols.side[i] === 0), 1: all.filter((i) => data.cols.side[i] === 1) };
    const b = "original right, " + cmp.label + " wrong";
    const c = "original wrong, " + cmp.label + " right";
    body.appendChild(el("p", {
      class: "summary",
      text: "b = " + bySide[0].length + " (" + b + "), c = " + bySide[1].length + " (" + c + ")",
    }));
    for (const side of [0, 1]) {
      const list = bySide[side];
      if (!list.length) continue;
      const section = el("section", { class: "side side-" + (side ? "c" : "b") }, [
        el("h4", { text: (side ? "c: " + c : "b: " + b) + " (" + list.length + ")" }),
      ]);
      for (const i of list.slice(0, state.shown[side])) section.appendChild(pair(i, cmp));
      if (list.length > state.shown[side]) {
        const more = el("button", { class: "more", text: "show " + Math.min(PAGE, list.length - state.shown[side]) + " more" });
        more.addEventListener("click", () => {
          state.shown[side] += PAGE;
          render();
        });
        section.appendChild(more);
      }
      body.appendChild(section);
    }
  }

  async function open(cmp, dataset, test, category, side) {
    const started = performance.now();
    panel.hidden = false;
    panel.dataset.state = "loading";
    await load();
    Object.assign(state, { cmp, dataset, test, category, prompt: "", side, shown: { 0: PAGE, 1: PAGE } });
    render();
    panel.dataset.state = "ready";
    panel.dataset.openMs = String(performance.now() - started);
  }

  document.addEventListener("click", (ev) => {
    const b = ev.target.closest("button.drill");
    if (b) {
      ev.preventDefault();
      open(Number(b.dataset.cmp), b.dataset.dataset, b.dataset.test, b.dataset.category, b.dataset.side || "");
    }
  });
  panel.querySelector(".drill-close").addEventListener("click", () => {
    panel.hidden = true;
    panel.dataset.state = "closed";
  });
  document.addEventListener("keydown", (ev) => {
    if (ev.key === "Escape" && !panel.hidden) panel.querySelector(".drill-close").click();
  });
  window.candorDrill = { open, load };
})();
