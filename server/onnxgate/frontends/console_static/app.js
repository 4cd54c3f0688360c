// The onnxgate operator console. Plain JavaScript, no build step, no third-party code.
//
// Everything shown comes from the gateway's documented HTTP API, asked with the user's token
// (Authorization: Bearer, kept in sessionStorage only: never in a URL, never logged). Every datum
// is put in the page as text (textContent, createElement): never parsed as HTML.
"use strict";

(() => {
  const POLL_MS = 2000;
  const HISTORY = 150; // points per chart: 5 minutes at one poll every 2 s
  const TOKEN_KEY = "onnxgate.token";
  const $ = (id) => document.getElementById(id);

  // -- DOM helpers: text only --------------------------------------------------------------
  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = String(value);
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }
  const fmt = (v, digits = 2) => (v === null || v === undefined ? "–" : Number(v).toFixed(digits));
  let uid = 0;
  const nextId = (prefix) => `${prefix}-${++uid}`;

  // -- the API -----------------------------------------------------------------------------
  const token = () => sessionStorage.getItem(TOKEN_KEY) || "";

  class Refused extends Error {
    constructor(status, message) { super(message); this.status = status; }
  }

  // One call with the token; a refusal (its JSON error) is thrown as Refused.
  async function send(method, path, body, accept) {
    const headers = { "Accept": accept };
    const t = token();
    if (t) headers["Authorization"] = `Bearer ${t}`;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const reply = await fetch(path, {
      method, headers, body: body === undefined ? undefined : JSON.stringify(body),
      credentials: "omit", cache: "no-store", referrerPolicy: "no-referrer",
    });
    if (!reply.ok) throw new Refused(reply.status, (parse(await reply.text()) || {}).error || reply.statusText || "failed");
    return reply;
  }

  function parse(text) {
    try { return text ? JSON.parse(text) : null; } catch (_) { return null; }
  }

  async function api(method, path, body) {
    return parse(await (await send(method, path, body, "application/json")).text());
  }

  function explain(err, what) {
    if (!(err instanceof Refused)) return `${what}: the gateway could not be reached (${err.message})`;
    const hints = {
      401: "refused (401): sign in with a token",
      403: "refused (403): this token lacks the scope it needs (actions need admin)",
      404: "refused (404): not found",
      409: "refused (409): conflict",
      429: "refused (429): busy, try again in a moment",
      501: "refused (501): not supported here",
      503: "refused (503): unavailable",
    };
    return `${what} ${hints[err.status] || `failed (${err.status})`}: ${err.message}`;
  }

  function say(text, kind) {
    const m = $("message");
    m.textContent = text;
    m.className = `message ${kind || ""}`;
  }

  function refocus(label) {
    // The refresh rebuilds what it shows: give the focus back to the control of the same name.
    if (!label || (document.activeElement && document.activeElement !== document.body)) return;
    const again = [...document.querySelectorAll("button, input, select")]
      .find((e) => e.getAttribute("aria-label") === label);
    if (again) again.focus();
  }

  async function act(question, what, call) {
    const label = document.activeElement ? document.activeElement.getAttribute("aria-label") : null;
    if (!window.confirm(question)) { refocus(label); return false; }
    let done = false;
    try {
      await call();
      say(`${what}: done`, "done");
      done = true;
    } catch (err) {
      say(explain(err, what), "error");
    }
    await poll(true);
    refocus(label);
    return done;
  }

  // -- charts: small SVG polylines of a history -------------------------------------------
  const SVG = "http://www.w3.org/2000/svg";
  const histories = new Map(); // key -> [numbers]

  function remember(key, value) {
    let h = histories.get(key);
    if (!h) histories.set(key, (h = []));
    h.push(value === null || value === undefined ? null : Number(value));
    if (h.length > HISTORY) h.shift();
    return h;
  }

  function chart(label, values, unit, span = HISTORY) {
    const w = 300, h = 70;
    const known = values.filter((v) => v !== null && Number.isFinite(v));
    const svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("class", "chart");
    svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
    svg.setAttribute("role", "img");
    const last = known.length ? known[known.length - 1] : null;
    svg.setAttribute("aria-label", `${label}: ${last === null ? "no data yet" : fmt(last, 3) + " " + unit}`);
    const title = document.createElementNS(SVG, "title");
    title.textContent = label;
    svg.append(title);
    if (known.length) {
      const lo = Math.min(0, ...known), hi = Math.max(...known, lo + 1e-9);
      const points = [];
      values.forEach((v, i) => {
        if (v === null || !Number.isFinite(v)) return;
        const x = w - 2 - ((values.length - 1 - i) / Math.max(1, span - 1)) * (w - 4); // newest at the right
        const y = h - 14 - ((v - lo) / (hi - lo)) * (h - 22);
        points.push(`${x.toFixed(1)},${y.toFixed(1)}`);
      });
      const line = document.createElementNS(SVG, "polyline");
      line.setAttribute("points", points.join(" "));
      const [cx, cy] = points[points.length - 1].split(",");
      const dot = document.createElementNS(SVG, "circle"); // the newest value, seen even when it is the only one
      dot.setAttribute("cx", cx);
      dot.setAttribute("cy", cy);
      dot.setAttribute("r", "2.5");
      svg.append(line, dot);
    }
    const caption = document.createElementNS(SVG, "text");
    caption.setAttribute("x", "4");
    caption.setAttribute("y", String(h - 3));
    caption.textContent = `${label}: ${last === null ? "–" : fmt(last, 3)} ${unit}`;
    svg.append(caption);
    return svg;
  }

  function bars(batchSizes) {
    // executions in the window when there were any, else since the start: one measure for every bar
    const inWindow = batchSizes.some((b) => b.window > 0);
    const count = (b) => (inWindow ? b.window : b.executions);
    const max = Math.max(1, ...batchSizes.map(count));
    const box = el("div", { class: "bars", role: "img", "aria-label": `executions by batch size ` +
      `(${inWindow ? "in the window" : "since the start"}): ` + batchSizes.map((b) => `${b.size}: ${count(b)}`).join(", ") });
    for (const b of batchSizes) {
      const bar = el("span", { title: `batch ${b.size}: ${b.window} in the window, ${b.executions} in all` });
      bar.style.height = `${Math.max(0.1, (2 * count(b)) / max).toFixed(2)}rem`;
      box.append(el("span", { class: "bar-col" }, bar, el("small", { "aria-hidden": "true", text: b.size })));
    }
    return box;
  }

  // -- models ------------------------------------------------------------------------------
  const modelCards = new Map(); // name -> {card, stats, select}

  function modelCard(name) {
    let entry = modelCards.get(name);
    if (entry) return entry;
    const stats = el("div", { class: "table-wrap", role: "region", "aria-label": `versions of ${name}` });
    const charts = el("div", { class: "charts" });
    const selectId = nextId("pin");
    const select = el("select", { id: selectId });
    const heading = el("h3", { text: name });
    const actions = el("div", { class: "actions" },
      el("button", { type: "button", text: "Load", "aria-label": `Load ${name}`,
        onclick: () => act(`Load (and unpin) model "${name}"?`, `Load ${name}`,
          () => api("POST", `/v2/repository/models/${encodeURIComponent(name)}/load`, {})) }),
      el("label", { for: selectId, text: "Version" }), select,
      el("button", { type: "button", text: "Pin", "aria-label": `Pin ${name} to the chosen version`,
        onclick: () => {
          const v = select.value;
          if (!v) { say(`Pin ${name}: choose a version first`, "error"); return; }
          act(`Pin model "${name}" to version ${v}?`, `Pin ${name} to ${v}`,
            () => api("POST", `/v2/repository/models/${encodeURIComponent(name)}/load`,
              { parameters: { version: Number(v) } }));
        } }),
      el("button", { type: "button", text: "Roll back", "aria-label": `Roll back ${name}`,
        onclick: () => act(`Roll model "${name}" back to the version that served before?`, `Roll back ${name}`,
          () => api("POST", `/v2/repository/models/${encodeURIComponent(name)}/load`,
            { parameters: { rollback: true } })) }),
      el("button", { type: "button", class: "danger", text: "Unload", "aria-label": `Unload ${name}`,
        onclick: () => act(`Unload model "${name}"? It stops serving.`, `Unload ${name}`,
          () => api("POST", `/v2/repository/models/${encodeURIComponent(name)}/unload`, {})) }));
    const card = el("article", { class: "card model", "data-model": name }, heading, stats, charts, actions);
    entry = { card, stats, charts, select, versions: null };
    modelCards.set(name, entry);
    return entry;
  }

  // Put ``card`` at position ``index`` of ``grid`` only if it is not there already: moving a node
  // takes the keyboard focus from whatever inside it has it (every 2 s, for a card that stays).
  function place(grid, card, index) {
    const at = grid.children[index] || null;
    if (at !== card) grid.insertBefore(card, at);
  }

  function renderModels(summary) {
    const box = $("models");
    let grid = box.querySelector(".stack");
    if (!grid) box.replaceChildren((grid = el("div", { class: "stack" })));
    const seen = new Set();
    for (const m of summary.models) {
      seen.add(m.name);
      const entry = modelCard(m.name);
      const rows = [];
      for (const v of m.versions) {
        rows.push(el("tr", { "data-version": v.version },
          el("td", { text: v.version }),
          el("td", { class: `state-${v.state}`, text: v.state }),
          el("td", { text: v.provider || "–" }),
          el("td", { text: v.instances }),
          el("td", { text: fmt(v.request_rate) }),
          el("td", { text: fmt(v.failure_rate) }),
          el("td", { text: fmt(v.latency_mean_ms) }),
          el("td", { text: fmt(v.latency_p50_ms) }),
          el("td", { text: fmt(v.latency_p99_ms) }),
          el("td", { text: fmt(v.queue_p99_ms) }),
          el("td", { text: fmt(v.execute_p99_ms) }),
          el("td", { text: v.queue_depth }),
          el("td", {}, v.batch_sizes.length ? bars(v.batch_sizes) : "–")));
        if (v.reason) {
          rows.push(el("tr", { class: "reason-row" }, el("td", {}),
            el("td", { class: "reason", colspan: 12, text: v.reason })));
        }
      }
      const head = el("tr", {}, ...["version", "state", "provider", "instances", "req/s", "failed/s", "mean ms",
        "p50 ms", "p99 ms", "queue p99 ms", "exec p99 ms", "queued", "batch sizes"].map((t) => el("th", { scope: "col", text: t })));
      const table = el("table", {}, el("caption", { class: "note",
        text: `${m.request_rate === null ? "–" : fmt(m.request_rate)} req/s · p50 ${fmt(m.latency_p50_ms)} ms · ` +
          `p99 ${fmt(m.latency_p99_ms)} ms` }), el("thead", {}, head), el("tbody", {}, rows));
      const parts = [table];
      if (!m.versions.length) parts.push(el("p", { class: "state-UNAVAILABLE", text: "No version serves: UNAVAILABLE" }));
      if (m.reason) parts.push(el("p", { class: "reason", text: m.reason }));
      entry.stats.replaceChildren(...parts);
      const rate = remember(`rate:${m.name}`, m.request_rate);
      const p99 = remember(`p99:${m.name}`, m.latency_p99_ms);
      if (m.ready_versions.length) entry.charts.replaceChildren(chart("requests/s", rate, "req/s"),
        chart("p99 latency", p99, "ms"));
      else entry.charts.replaceChildren();
      // a pin may name any version in the repository, loaded or not
      const states = new Map(m.versions.map((v) => [v.version, v.state]));
      const choices = [...new Set([...(m.available_versions || []), ...states.keys()])].sort((a, b) => a - b);
      const versions = choices.map((v) => `${v}:${states.get(v) || ""}`).join(",");
      if (versions !== entry.versions && document.activeElement !== entry.select) {
        entry.versions = versions;
        entry.select.replaceChildren(el("option", { value: "", text: "choose…" }),
          ...choices.map((v) => el("option", { value: v, text: `${v} (${states.get(v) || "not loaded"})` })));
      }
      place(grid, entry.card, seen.size - 1); // in the summary's order
    }
    for (const [name, entry] of modelCards) {
      if (!seen.has(name)) { entry.card.remove(); modelCards.delete(name); }
    }
    $("window").textContent = summary.window_s > 0
      ? `Rates and latencies over the last ${fmt(summary.window_s, 0)} s.`
      : "Rates and latencies appear from the next refresh.";
  }

  // -- sample log and drift ----------------------------------------------------------------
  // The drift report is HTML from the gateway (GET /v2/drift/{model}/report). A URL cannot carry
  // the token, so it is fetched with it, as a Blob, and shown from a blob: URL in a frame that is
  // sandboxed (no script, an origin of its own); the frame lives outside what each poll rebuilds.
  const report = { panel: null, url: null, busy: false };

  function reportPanel() {
    if (!report.panel) {
      report.panel = el("div", { id: "drift-report", class: "drift-report", "aria-live": "polite" });
      $("samples").after(report.panel);
    }
    return report.panel;
  }

  function closeReport() {
    if (report.url) URL.revokeObjectURL(report.url);
    report.url = null;
    reportPanel().replaceChildren();
  }

  async function openReport(model) {
    const what = `Drift report of ${model}`;
    if (report.busy) { say(`${what}: a report is being fetched already`, "error"); return; }
    report.busy = true;
    say(`${what}: rendering…`, "");
    try {
      const reply = await send("GET", `/v2/drift/${encodeURIComponent(model)}/report`, undefined, "text/html");
      const blob = await reply.blob();
      closeReport();
      report.url = URL.createObjectURL(blob);
      const close = el("button", { type: "button", text: "Close report", "aria-label": "Close the drift report",
        onclick: () => {
          closeReport();
          say("", "");
          const again = [...document.querySelectorAll("button")].find((b) => b.getAttribute("aria-label") === what);
          if (again) again.focus(); // back to the button that opened it
        } });
      reportPanel().replaceChildren(
        el("div", { class: "actions" }, el("h3", { text: what }), close,
          el("a", { href: report.url, download: "drift-report.html", text: "Download" })),
        el("iframe", { class: "report", src: report.url, sandbox: "", title: what, referrerpolicy: "no-referrer" }));
      say(`${what}: opened below the drift section`, "done");
      close.focus();
    } catch (err) {
      const text = explain(err, what);
      say(text, "error");
      closeReport();
      reportPanel().replaceChildren(el("p", { class: "reason", role: "alert", text }));
    } finally {
      report.busy = false;
    }
  }

  const threshold = (t) => (t === null || t === undefined ? "–" : String(t));

  // A drift card stays in the page from one refresh to the next (its button and its scrolling
  // table keep the keyboard focus); what it shows is replaced inside it.
  function driftCard(model) {
    const body = el("div");
    const wrap = el("div", { class: "table-wrap", role: "region", "aria-label": `drift of ${model} by feature` });
    const card = el("article", { class: "card drift", "data-drift": model }, el("h3", { text: `Drift of ${model}` }),
      body, wrap, el("div", { class: "actions" }, el("button", { type: "button", text: "Drift report",
        "aria-label": `Drift report of ${model}`, onclick: () => openReport(model) })));
    return { card, body, wrap };
  }

  function fillDrift(entry, d) {
    const psiMax = Math.max(1, 2 * (d.psi_threshold || 0));
    const rows = d.features.map((f) => {
      const meter = el("meter", { min: 0, max: psiMax, value: Math.min(psiMax, f.psi || 0), optimum: 0,
        low: d.psi_threshold, high: d.psi_threshold,
        "aria-label": `PSI of ${f.feature}: ${fmt(f.psi, 3)}, threshold ${threshold(d.psi_threshold)}` });
      const over = d.psi_threshold !== null && f.psi !== null && f.psi >= d.psi_threshold;
      return el("tr", { class: over ? "drifted" : "" }, el("td", { text: f.feature }),
        el("td", {}, meter, ` ${fmt(f.psi, 3)} / ${threshold(d.psi_threshold)}`),
        el("td", { text: fmt(f.ks, 3) }));
    });
    const tests = [`PSI ≥ ${threshold(d.psi_threshold)}`];
    if (d.ks_pvalue !== null) tests.push(`KS p < ${d.ks_pvalue}`);
    if (d.chi2_pvalue !== null) tests.push(`chi-square p < ${d.chi2_pvalue}`);
    entry.body.replaceChildren(
      el("p", { class: d.alert ? "reason" : "note",
        text: `${d.alert ? "A feature crosses its drift threshold" : "Within the thresholds"} · ` +
          `${d.window_rows}${d.window === null ? "" : ` of ${d.window}`} rows in the window` +
          (d.min_rows === null ? "" : ` (statistics from ${d.min_rows})`) }),
      el("p", { class: "note", text: `Thresholds: ${tests.join(", ")}` }));
    entry.wrap.replaceChildren(el("table", {},
      el("thead", {}, el("tr", {}, ["feature", "PSI / threshold", "KS"].map((t) => el("th", { scope: "col", text: t })))),
      el("tbody", {}, rows)));
  }

  const samples = { counts: null, chart: null, list: null, drift: new Map() }; // model -> driftCard

  function renderSamples(log) {
    const box = $("samples");
    reportPanel();
    if (!log) {
      box.replaceChildren(el("p", { class: "note", text: "No sample log is configured (sample_log in the config file)." }));
      samples.counts = null;
      samples.drift.clear();
      return;
    }
    if (!samples.counts || !box.contains(samples.counts)) {
      samples.counts = el("p");
      samples.chart = el("div");
      samples.list = el("div");
      samples.drift.clear();
      box.replaceChildren(samples.counts, samples.chart, samples.list);
    }
    const dropped = Object.entries(log.records_dropped).filter(([, n]) => n > 0);
    samples.counts.textContent = `Records written ${log.records_written}, queued ${log.queue_depth}, dropped ` +
      (dropped.length ? dropped.map(([r, n]) => `${n} (${r})`).join(", ") : "none");
    samples.chart.replaceChildren(chart("records written", remember("records", log.records_written), "records"));
    const seen = new Set();
    for (const d of log.drift) {
      seen.add(d.model);
      let entry = samples.drift.get(d.model);
      if (!entry) samples.drift.set(d.model, (entry = driftCard(d.model)));
      fillDrift(entry, d);
      place(samples.list, entry.card, seen.size - 1);
    }
    for (const [model, entry] of samples.drift) {
      if (!seen.has(model)) { entry.card.remove(); samples.drift.delete(model); }
    }
    if (!log.drift.length) {
      samples.list.replaceChildren(el("p", { class: "note", text: "No live drift is configured (drift.models in the "
        + "config file)." }));
    } else {
      for (const stray of [...samples.list.children]) if (stray.tagName === "P") stray.remove();
    }
  }

  // -- routes ------------------------------------------------------------------------------
  const routeCards = new Map(); // name -> {card, editor, details, config}

  // ``latest()``: the route as the newest refresh read it. A save sends the weights typed here over
  // that (not over the route as it was when the editor was made: a shadow or rollout removed since
  // would come back); a split whose targets changed since is not saved.
  function weightEditor(route, latest) {
    const inputs = [];
    const fields = route.split.map((s) => {
      const id = nextId("weight");
      const input = el("input", { id, type: "number", min: "0", step: "any", value: s.weight });
      inputs.push(input);
      return el("span", { class: "field" }, el("label", { for: id, text: `${s.target} weight` }), input);
    });
    const form = el("form", { class: "weights" },
      el("fieldset", {}, el("legend", { text: "Split weights" }), fields,
        el("button", { type: "submit", text: "Save weights", "aria-label": `Save the weights of route ${route.name}` })));
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const split = route.split.map((s, i) => ({ target: s.target, weight: Number(inputs[i].value) }));
      const now = latest() || route;
      if (now.split.map((s) => s.target).join("\n") !== route.split.map((s) => s.target).join("\n")) {
        say(`Save weights of ${route.name}: its targets changed meanwhile; the editor shows them now`, "error");
        poll(true);
        return;
      }
      const doc = { ...now, split };
      delete doc.name;
      act(`Change the split of route "${route.name}" to ${split.map((s) => `${s.target}: ${s.weight}`).join(", ")}?`,
        `Save weights of ${route.name}`,
        () => api("PUT", `/v2/routes/${encodeURIComponent(route.name)}`, doc)).then((done) => {
        if (!done) route.split.forEach((s, i) => { inputs[i].value = s.weight; }); // back to what serves
      });
    });
    return form;
  }

  // The rollout's actions are made once per route and stay (they keep the focus, and a press that
  // spans a refresh still lands); what it shows (phase, gates, decisions) is replaced at each refresh.
  function rolloutActions(name) {
    return el("div", { class: "actions" }, ["pause", "resume", "promote", "abort"].map((action) =>
      el("button", { type: "button", class: action === "abort" ? "danger" : "", text: action,
        "aria-label": `${action} the rollout of route ${name}`,
        onclick: () => act(`${action[0].toUpperCase()}${action.slice(1)} the rollout of route "${name}"?`,
          `Rollout ${action} on ${name}`,
          () => api("POST", `/v2/routes/${encodeURIComponent(name)}/rollout/${action}`,
            { reason: "from the console" })) })));
  }

  function rolloutInfo(name, rollout) {
    const gates = el("table", {}, el("thead", {}, el("tr", {}, ["gate", "threshold", "value", "bound", "verdict"]
      .map((t) => el("th", { scope: "col", text: t })))),
      el("tbody", {}, (rollout.gates || []).map((g) => el("tr", {}, el("td", { text: g.name }),
        el("td", { text: g.threshold }), el("td", { text: fmt(g.value, 4) }), el("td", { text: fmt(g.bound, 4) }),
        el("td", { text: g.verdict })))));
    const history = el("ol", {}, (rollout.history || []).slice(-5).map((d) => el("li", {
      text: `${new Date(d.time * 1000).toLocaleTimeString()} ${d.decision} → ${d.weight} % (${d.by || ""}): ` +
        d.reason })));
    return [el("p", { text: `Rollout of ${rollout.candidate}: ${rollout.phase}, step ${rollout.step_index + 1} of ` +
        `${rollout.steps.length}, candidate weight ${rollout.candidate_weight} %` +
        (rollout.reason ? ` — ${rollout.reason}` : "") }),
      el("div", { class: "table-wrap", role: "region", "aria-label": `gates of the rollout of route ${name}` }, gates),
      el("p", { class: "note", text: "Latest decisions" }), history];
  }

  // The gateway's history of a comparison: one value per slot of the last ten minutes (null where
  // no request was compared), oldest first, so the page draws the last minutes as soon as it opens.
  function slots(comparison, field, scale = 1) {
    const step = comparison.slot_s || 10, count = 60;
    const newest = Math.floor(Date.now() / 1000 / step) * step;
    const byStart = new Map((comparison.history || []).map((s) => [s.t, s[field]]));
    const out = [];
    for (let i = count - 1; i >= 0; i--) {
      const v = byStart.get(newest - i * step);
      out.push(v === null || v === undefined ? null : v * scale);
    }
    return out;
  }

  // A route's comparison stays in the page (its scrolling table keeps the focus); its text,
  // charts and quantiles are replaced inside it at every refresh.
  function comparisonPart(name) {
    const text = el("p"), charts = el("div"), note = el("div");
    const wrap = el("div", { class: "table-wrap", role: "region", "aria-label": `difference quantiles of route ${name}` });
    return { node: el("div", { class: "comparison" }, text, charts, note, wrap), text, charts, note, wrap };
  }

  function fillComparison(part, comparison) {
    const agreement = comparison.argmax_agreement || {};
    const c = comparison.counts;
    const step = comparison.slot_s || 10;
    const span = `${step} s slots, last 10 min`;
    part.text.textContent = `Shadow comparison: ${c.compared} compared, ${c.failed} failed, ${c.dropped} dropped; ` +
      `agreement ${agreement.rate === null || agreement.rate === undefined ? "–" : fmt(agreement.rate * 100, 1) + " %"}`;
    part.charts.replaceChildren(
      chart(`agreement (${span})`, slots(comparison, "agreement"), "share", 60),
      chart(`worst max |diff| (${span})`, slots(comparison, "max_abs_diff"), "", 60),
      chart(`latency diff, mean (${span})`, slots(comparison, "latency_diff_mean_s", 1000), "ms", 60));
    const table = quantilesTable(comparison);
    if (table.tagName === "TABLE") { part.note.replaceChildren(); part.wrap.hidden = false; part.wrap.replaceChildren(table); }
    else { part.note.replaceChildren(table); part.wrap.hidden = true; part.wrap.replaceChildren(); }
  }

  // The difference quantiles of each (primary, shadow) pair over its window of recent comparisons.
  function quantilesTable(comparison) {
    const measures = [["max |diff|", "max_abs_diff", 1, 4], ["mean |diff|", "mean_abs_diff", 1, 4],
      ["latency diff (shadow - primary), ms", "latency_diff_s", 1000, 2]];
    const rows = [];
    for (const pair of comparison.pairs || []) {
      for (const [label, field, scale, digits] of measures) {
        const q = pair[field];
        rows.push(el("tr", {}, el("td", { text: `${pair.primary} → ${pair.shadow}` }), el("td", { text: label }),
          ...["p50", "p90", "p99", "max"].map((k) => el("td", { text: q ? fmt(q[k] * scale, digits) : "–" }))));
      }
    }
    if (!rows.length) return el("p", { class: "note", text: "No comparison yet: difference quantiles appear once "
      + "the shadow has answered." });
    return el("table", { class: "quantiles" },
      el("caption", { class: "note", text: "Differences over the window of recent comparisons" }),
      el("thead", {}, el("tr", {}, ["pair", "measure", "p50", "p90", "p99", "max"]
        .map((t) => el("th", { scope: "col", text: t })))),
      el("tbody", {}, rows));
  }

  async function renderRoutes() {
    const routes = await api("GET", "/v2/routes");
    const box = $("routes");
    if (!routes.length) { box.replaceChildren(el("p", { class: "note", text: "No routes." })); routeCards.clear(); return; }
    let grid = box.querySelector(".cards");
    if (!grid) box.replaceChildren((grid = el("div", { class: "cards" })));
    const seen = new Set();
    // by name: a change moves a route to the end of GET /v2/routes, and a card that moves loses the focus
    for (const route of [...routes].sort((x, y) => (x.name < y.name ? -1 : x.name > y.name ? 1 : 0))) {
      seen.add(route.name);
      let entry = routeCards.get(route.name);
      const config = JSON.stringify(route);
      if (entry) entry.latest = route;
      if (!entry) {
        entry = { card: el("article", { class: "card route", "data-route": route.name }), summary: el("div"),
          editor: el("div"), details: el("div"), error: el("div"), comparison: comparisonPart(route.name),
          rollout: el("div", { class: "rollout" }), rolloutInfo: el("div"), rolloutActions: null, config: "",
          latest: route };
        entry.rollout.append(entry.rolloutInfo);
        entry.details.append(entry.error, entry.comparison.node, entry.rollout);
        entry.card.append(el("h3", { text: route.name }), entry.summary, entry.editor, entry.details);
        routeCards.set(route.name, entry);
      }
      if (config !== entry.config && !entry.editor.contains(document.activeElement)) {
        entry.config = config;
        entry.editor.replaceChildren(weightEditor(route, () => entry.latest));
      }
      const total = route.split.reduce((a, s) => a + s.weight, 0) || 1;
      entry.summary.replaceChildren(el("p", { text: "Split: " + route.split.map((s) =>
        `${s.target} ${fmt((100 * s.weight) / total, 1)} %`).join(", ") +
        (route.sticky ? ` · sticky ${route.sticky}` : "") +
        (route.shadow ? ` · shadow ${route.shadow.target} (${fmt(route.shadow.fraction * 100, 0)} %)` : "") }));
      try {
        entry.comparison.node.hidden = !(route.shadow || route.rollout);
        if (route.shadow || route.rollout) fillComparison(entry.comparison,
          await api("GET", `/v2/routes/${encodeURIComponent(route.name)}/comparison`));
        const rollout = route.rollout ? await api("GET", `/v2/routes/${encodeURIComponent(route.name)}/rollout`) : null;
        entry.rollout.hidden = !rollout;
        entry.rolloutInfo.replaceChildren(...(rollout ? rolloutInfo(route.name, rollout) : []));
        if (rollout && !entry.rolloutActions) entry.rollout.append((entry.rolloutActions = rolloutActions(route.name)));
        entry.error.replaceChildren();
      } catch (err) {
        entry.error.replaceChildren(el("p", { class: "reason", text: explain(err, "Reading the route") }));
      }
      place(grid, entry.card, seen.size - 1);
    }
    for (const [name, entry] of routeCards) {
      if (!seen.has(name)) { entry.card.remove(); routeCards.delete(name); }
    }
  }

  // -- readiness and the poll loop ---------------------------------------------------------
  function banner(summary) {
    const b = $("banner");
    if (summary.draining) {
      b.textContent = "The gateway is draining: it is shutting down and takes no new requests.";
      b.className = "banner bad";
      b.hidden = false;
    } else if (!summary.ready) {
      b.textContent = "The gateway is not ready: it is still loading its models, or it has stopped serving.";
      b.className = "banner";
      b.hidden = false;
    } else {
      b.hidden = true;
    }
  }

  function clearData() {
    const none = (id) => $(id).replaceChildren(el("p", { class: "note", text: "Sign in to see this." }));
    none("models");
    none("routes");
    none("samples");
    $("window").textContent = "";
    modelCards.clear();
    routeCards.clear();
    samples.counts = null;
    samples.drift.clear();
    closeReport();
    $("banner").hidden = true;
  }

  let timer = null;
  let busy = false;
  let lastStatus = 0; // of the latest refresh

  async function poll(now) {
    if (timer !== null) { clearTimeout(timer); timer = null; }
    if (busy) { if (now) timer = setTimeout(poll, 200); return; }
    busy = true;
    const started = performance.now();
    try {
      const summary = await api("GET", "/v2/models/summary");
      banner(summary);
      renderModels(summary);
      renderSamples(summary.sample_log);
      await renderRoutes();
      lastStatus = 200;
      const m = $("message");
      if (m.classList.contains("poll-error")) say("", "");
      $("login").classList.toggle("open", !token()); // an open gateway: no token needed to look
    } catch (err) {
      if (err instanceof Refused && err.status === 503) {  // the drain's answer to what it no longer serves
        banner({ draining: /drain|shutting down/i.test(err.message), ready: false });
      }
      say(explain(err, "Reading the gateway"), "error poll-error");
      // signed out (or the token expired): nothing from before stays in view; the token field
      // takes the focus once, not at every refresh
      if (err instanceof Refused && err.status === 401) clearData();
      if (err instanceof Refused && err.status === 401 && lastStatus !== 401) $("token").focus();
      lastStatus = err instanceof Refused ? err.status : 0;
    } finally {
      busy = false;
      timer = setTimeout(poll, Math.max(0, POLL_MS - (performance.now() - started))); // one poll every 2 s
    }
  }

  function start() {
    $("login").addEventListener("submit", (event) => {
      event.preventDefault();
      const value = $("token").value.trim();
      $("token").value = "";
      if (value) sessionStorage.setItem(TOKEN_KEY, value);
      else sessionStorage.removeItem(TOKEN_KEY);
      say(value ? "Signed in for this tab." : "No token: the gateway's open endpoints only.", "done");
      poll(true);
    });
    $("signout").addEventListener("click", () => {
      sessionStorage.removeItem(TOKEN_KEY);
      say("Signed out.", "done");
      poll(true);
    });
    poll(true);
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
