"""The compare page: one HTML document with inline CSS and plain JavaScript, no framework and nothing
fetched from anywhere but this server's own JSON endpoints (trainer/compare/app.py).

It holds no run data itself: the script polls `/api/state` every few seconds and, when its
signature changes (a checkpoint saved, more steps logged), fetches the answers, plots and
predictions again, so new checkpoints appear without a reload. Every text from the run or a model
is put into the page with `textContent`, never parsed as HTML. When the server wants a key, the page
asks for it once and keeps it for the tab (sessionStorage), sending it as `Authorization: Bearer`.
"""

from __future__ import annotations

from trainer.report_html import CSS as REPORT_CSS

EXTRA_CSS = """
.bar { display: flex; flex-wrap: wrap; gap: 10px 18px; align-items: center; margin: 8px 0; }
.bar label { font-size: 13px; }
.bar input[type=number], .bar input[type=text] { width: 90px; }
textarea { width: 100%; box-sizing: border-box; font-family: "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: 13px; }
button { font-size: 14px; padding: 5px 16px; cursor: pointer; }
.live { display: inline-block; width: 9px; height: 9px; border-radius: 50%; background: #3a9b45; margin-right: 5px; }
.live.stale { background: #c0392b; }
.results { display: grid; grid-template-columns: repeat(auto-fill, minmax(260px, 1fr)); gap: 10px; margin: 10px 0; }
.result { border: 1px solid #d0d0d0; border-radius: 6px; padding: 8px 10px; background: #fcfcfd; }
.result h3 { margin: 0 0 6px; font-size: 14px; }
.result[data-state=running] { opacity: .6; }
.result .error, .error-box { color: #a61b1b; white-space: pre-wrap; }
.correct { background: #e7f6e9; }
.wrong { background: #fde8e8; }
.new { animation: flash 2s ease-out; }
@keyframes flash { from { background: #fff3b0; } to { background: transparent; } }
#key-box { background: #fff8dc; border: 1px solid #e8cf6b; border-radius: 6px; padding: 10px 14px; }
.plots { display: flex; flex-wrap: wrap; gap: 10px; align-items: flex-start; }
.plots img.plot { flex: none; width: auto; max-width: 100%; }
table.preds th:first-child { width: 44px; }
.hidden { display: none; }
"""

SCRIPT = r"""
"use strict";
const POLL_MS = __POLL_MS__;
let signature = null, knownCheckpoints = [], testPrompts = [], unchecked = new Set(), failures = 0;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") node.className = value; else if (name === "text") node.textContent = value;
    else node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}
const $ = (id) => document.getElementById(id);
const num = (value, digits) => (value === null || value === undefined) ? "\u2013" : Number(value).toFixed(digits);
const key = () => sessionStorage.getItem("trainer-compare-key");

async function api(path, options) {
  options = options || {};
  const headers = Object.assign({}, options.headers || {});
  if (key()) headers["Authorization"] = "Bearer " + key();
  const response = await fetch(path, Object.assign({}, options, {headers}));
  if (response.status === 401) { $("key-box").classList.remove("hidden"); throw new Error("the server wants its API key"); }
  const body = await response.json();
  if (!response.ok) throw new Error((body.error && body.error.message) || ("HTTP " + response.status));
  return body;
}

function saveKey(event) {
  event.preventDefault();
  sessionStorage.setItem("trainer-compare-key", $("key").value.trim());
  $("key-box").classList.add("hidden");
  signature = null;
  poll();
}

async function poll() {
  try {
    const state = await api("/api/state");
    failures = 0;
    $("live").className = "live";
    if (state.signature !== signature) {
      signature = state.signature;
      await showState(state);
    }
    $("updated").textContent = "checked " + new Date().toLocaleTimeString();
  } catch (error) {
    failures += 1;
    $("live").className = "live stale";
    $("updated").textContent = "cannot reach the server: " + error.message;
  }
}

async function showState(state) {
  document.title = "Compare: " + state.title;
  $("title").textContent = "Compare checkpoints: " + state.title;
  const status = state.status || {};
  const facts = [state.run, state.checkpoints.length + " checkpoint" + (state.checkpoints.length === 1 ? "" : "s")];
  if (status.status) facts.push("status: " + status.status + (status.step !== undefined ? ", step " + status.step + (status.total_steps ? " of " + status.total_steps : "") : ""));
  $("facts").textContent = facts.join(" \u00b7 ");
  $("summary").classList.toggle("none", !state.best);
  $("summary").replaceChildren(...(state.best ? [el("span", {class: "badge", text: "recommended"}), " ", el("strong", {text: state.best}), ": " + state.why]
                                              : [state.checkpoints.length ? "No recommendation: no task metric and no eval loss (no validation data); compare the answers below." : "No checkpoint yet."]));
  const previous = new Set(knownCheckpoints.map((c) => c.name));
  knownCheckpoints = state.checkpoints;
  showCheckpoints(state, previous);
  showChoices();
  const [answers, plots] = await Promise.all([api("/api/answers"), api("/api/plots")]);
  showAnswers(answers, state.best, previous);
  showPlots(plots);
  $("predictions-section").classList.toggle("hidden", !state.predictions);
  if (state.predictions) await showPredictions();
}

function showCheckpoints(state, previous) {
  const body = $("checkpoints").querySelector("tbody"), head = $("checkpoints").querySelector("thead tr");
  head.replaceChildren(...["checkpoint", "step", "epoch", "train loss", "eval loss", ...state.metric_names].map((t) => el("th", {text: t})));
  body.replaceChildren();
  $("no-checkpoints").classList.toggle("hidden", state.checkpoints.length > 0);
  for (const c of state.checkpoints) {
    const best = c.name === state.best;
    const row = el("tr", {"data-checkpoint": c.name, class: (best ? "best " : "") + (signature && previous.size && !previous.has(c.name) ? "new" : "")},
      el("td", {class: "ckpt"}, c.name, best ? el("span", {class: "badge", text: "recommended", title: state.why}) : null,
         c.kind === "full" ? el("div", {class: "muted", text: "full model"}) : el("div", {class: "muted", text: "LoRA adapter"})),
      el("td", {class: "num", text: c.step}), el("td", {class: "num", text: num(c.epoch, 2)}),
      el("td", {class: "num", text: num(c.train_loss, 4)}), el("td", {class: "num", text: num(c.eval_loss, 4)}),
      state.metric_names.map((m) => el("td", {class: "num", text: m in c.metrics ? num(c.metrics[m], 4) : "\u2013"})));
    body.append(row);
  }
}

function showChoices() {
  const box = $("choices");
  box.replaceChildren();
  for (const c of knownCheckpoints) {
    const input = el("input", {type: "checkbox", value: c.name, checked: !unchecked.has(c.name)});
    input.addEventListener("change", () => { if (input.checked) unchecked.delete(c.name); else unchecked.add(c.name); });
    box.append(el("label", {}, input, " " + c.name));
  }
}

function parameterText(parameters) {
  return Object.entries(parameters || {}).map(([name, value]) => name + ": " + (typeof value === "string" ? value : JSON.stringify(value))).join("  ");
}

function showAnswers(data, best, previous) {
  testPrompts = data.prompts;
  const table = $("answers");
  $("no-prompts").classList.toggle("hidden", data.prompts.length > 0 && knownCheckpoints.length > 0);
  table.classList.toggle("hidden", !(data.prompts.length > 0 && knownCheckpoints.length > 0));
  table.querySelector("thead tr").replaceChildren(el("th", {class: "ckpt", text: "checkpoint"}),
    ...data.prompts.map((p, i) => el("th", {}, "Prompt " + (i + 1), el("div", {class: "text prompt-tail", text: p.label || "(empty prompt)"}),
                                        el("div", {class: "params", text: parameterText(p.parameters)}))));
  const body = table.querySelector("tbody");
  body.replaceChildren();
  for (const c of knownCheckpoints) {
    const cells = (data.answers[c.name] || []).map((answer) => {
      if (answer === null) return el("td", {}, el("span", {class: "empty", text: "no sample"}));
      const text = answer.completion === "" ? el("span", {class: "empty", text: "(empty completion)"}) : el("div", {class: "text", text: answer.completion});
      const finish = answer.finish_reason && answer.finish_reason !== "eos" ? el("div", {class: "finish " + answer.finish_reason, text: "ended: " + answer.finish_reason}) : null;
      return el("td", {}, text, finish);
    });
    body.append(el("tr", {"data-checkpoint": c.name, class: c.name === best ? "best" : null},
      el("th", {class: "ckpt"}, c.name, el("div", {class: "muted", text: "eval loss " + num(c.eval_loss, 4)})), cells));
  }
  const select = $("fill");
  select.replaceChildren(el("option", {value: "", text: "fill in a test prompt\u2026"}),
    ...data.prompts.map((p, i) => el("option", {value: String(i), text: "Prompt " + (i + 1) + ": " + (p.label || "(empty)").slice(0, 60)})));
}

function showPlots(plots) {
  $("loss-plot").classList.toggle("hidden", !plots.loss);
  if (plots.loss) $("loss-plot").src = plots.loss;
  $("metrics-plot").classList.toggle("hidden", !plots.metrics);
  if (plots.metrics) $("metrics-plot").src = plots.metrics;
  $("plot-error").textContent = plots.error ? "The plot could not be drawn (" + plots.error + ")." : "";
}

async function showPredictions() {
  const how = $("filter").value, chosen = $("filter-checkpoint").value;
  const query = new URLSearchParams({filter: how, limit: "200"});
  if (how === "wrong" && chosen) query.set("checkpoint", chosen);
  let data;
  try { data = await api("/api/predictions?" + query); } catch (error) { $("predictions-count").textContent = error.message; return; }
  const select = $("filter-checkpoint");
  const keep = select.value;
  select.replaceChildren(el("option", {value: "", text: "any checkpoint"}), ...data.checkpoints.map((n) => el("option", {value: n, text: n})));
  select.value = data.checkpoints.includes(keep) ? keep : "";
  select.disabled = how !== "wrong";
  $("predictions-count").textContent = data.matching + " of " + data.total + " validation examples" + (data.matching > data.rows.length ? " (first " + data.rows.length + " shown)" : "");
  const table = $("predictions");
  table.querySelector("thead tr").replaceChildren(...["#", "prompt", "reference", ...data.checkpoints].map((t) => el("th", {text: t})));
  table.querySelector("tbody").replaceChildren(...data.rows.map((row) => el("tr", {},
    el("td", {class: "num", text: row.index}), el("td", {}, el("div", {class: "text", text: row.prompt})),
    el("td", {}, el("div", {class: "text", text: row.reference})),
    data.checkpoints.map((n) => {
      const p = row.predictions[n];
      if (!p) return el("td", {}, el("span", {class: "empty", text: "none"}));
      return el("td", {class: p.correct === true ? "correct" : p.correct === false ? "wrong" : null, "data-checkpoint": n},
                el("div", {class: "text", text: p.prediction}), el("div", {class: "finish", text: p.correct === true ? "correct" : p.correct === false ? "wrong" : ""}));
    }))));
}

function unescapeStop(text) {
  return text.replace(/\\(n|t|\\)/g, (_, c) => c === "n" ? "\n" : c === "t" ? "\t" : "\\");
}

function requestBody(name) {
  const body = {checkpoint: name};
  const text = $("prompt").value;
  if (document.querySelector("input[name=mode]:checked").value === "chat") {
    let messages;
    try { messages = JSON.parse(text); } catch (error) { throw new Error("the chat is not valid JSON (" + error.message + "): give a list like [{\"role\": \"user\", \"content\": \"Hi?\"}]"); }
    if (messages && !Array.isArray(messages) && Array.isArray(messages.messages)) messages = messages.messages;
    body.messages = messages;
  } else {
    body.prompt = text;
  }
  for (const [field, parse] of [["max_new_tokens", Number], ["temperature", Number], ["top_p", Number], ["top_k", Number], ["seed", Number]]) {
    const value = $(field).value.trim();
    if (value !== "") body[field] = parse(value);
  }
  const stops = $("stop").value.split("\n").filter((s) => s !== "").map(unescapeStop);
  if (stops.length) body.stop = stops;
  return body;
}

async function ask(event) {
  event.preventDefault();
  const names = knownCheckpoints.map((c) => c.name).filter((n) => !unchecked.has(n));
  const results = $("results");
  results.replaceChildren();
  $("ask-error").textContent = "";
  if (!names.length) { $("ask-error").textContent = "Choose at least one checkpoint."; return; }
  let bodies;
  try { bodies = names.map(requestBody); } catch (error) { $("ask-error").textContent = error.message; return; }
  await Promise.all(names.map(async (name, i) => {
    const output = el("pre", {class: "text completion", text: "generating\u2026"});
    const note = el("div", {class: "finish"});
    const card = el("div", {class: "result", "data-checkpoint": name, "data-state": "running"}, el("h3", {text: name}), output, note);
    results.append(card);
    try {
      const answer = await api("/api/generate", {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(bodies[i])});
      output.textContent = answer.completion;  // exactly the completion, also when it is empty
      note.textContent = (answer.completion === "" ? "(empty completion) \u00b7 " : "") + "ended: " + answer.finish_reason + " \u00b7 " + answer.completion_tokens + " tokens \u00b7 seed " + answer.seed + " \u00b7 " + answer.seconds + " s";
      card.dataset.state = "done";
    } catch (error) {
      output.replaceChildren(el("span", {class: "error", text: error.message}));
      card.dataset.state = "failed";
    }
  }));
}

function fill() {
  const prompt = testPrompts[Number($("fill").value)];
  if (!prompt) return;
  const chat = Array.isArray(prompt.messages);
  document.querySelector("input[name=mode][value=" + (chat ? "chat" : "text") + "]").checked = true;
  $("prompt").value = chat ? JSON.stringify(prompt.messages, null, 1) : prompt.prompt;
  const p = prompt.parameters || {};
  for (const field of ["max_new_tokens", "temperature", "top_p", "top_k"]) $(field).value = p[field] === undefined ? "" : p[field];
  $("seed").value = p.seed === undefined || p.seed === null ? "" : p.seed;
  $("stop").value = (p.stop || []).map((s) => s.replace(/\\/g, "\\\\").replace(/\n/g, "\\n").replace(/\t/g, "\\t")).join("\n");
}

document.addEventListener("DOMContentLoaded", () => {
  $("ask-form").addEventListener("submit", ask);
  $("key-form").addEventListener("submit", saveKey);
  $("fill").addEventListener("change", fill);
  for (const id of ["filter", "filter-checkpoint"]) $(id).addEventListener("change", showPredictions);
  poll();
  setInterval(poll, POLL_MS);
});
"""

BODY = """
<h1 id="title">Compare checkpoints</h1>
<p class="meta"><span id="live" class="live"></span><span id="facts"></span> &middot; <span id="updated"></span></p>
<div id="key-box" class="hidden"><form id="key-form">This server needs its API key:
  <input id="key" type="password" autocomplete="off" size="40"> <button type="submit">Use it</button>
  <span class="muted">(kept for this tab only)</span></form></div>

<div id="summary" class="summary none"></div>

<h2>Loss</h2>
<div class="plots"><img id="loss-plot" class="plot hidden" alt="train loss per step and eval loss per checkpoint">
<img id="metrics-plot" class="plot hidden" alt="task metrics per checkpoint"></div>
<p id="plot-error" class="empty"></p>
<table id="checkpoints" class="losses"><thead><tr></tr></thead><tbody></tbody></table>
<p id="no-checkpoints" class="empty">No checkpoint yet: each one appears here when it is saved.</p>

<h2>Answers to the test prompts</h2>
<table id="answers" class="grid"><thead><tr></tr></thead><tbody></tbody></table>
<p id="no-prompts" class="empty hidden">No answers yet.</p>

<section id="predictions-section" class="hidden">
<h2>Validation predictions</h2>
<div class="bar"><label>show <select id="filter">
  <option value="all">all examples</option>
  <option value="wrong">examples a checkpoint gets wrong</option>
  <option value="disagree">examples where checkpoints disagree</option></select></label>
  <label>wrong for <select id="filter-checkpoint" disabled><option value="">any checkpoint</option></select></label>
  <span id="predictions-count" class="muted"></span></div>
<table id="predictions" class="grid preds"><thead><tr></tr></thead><tbody></tbody></table>
</section>

<h2>Ask the checkpoints</h2>
<form id="ask-form">
<div class="bar"><label><input type="radio" name="mode" value="text" checked> plain text prompt</label>
  <label><input type="radio" name="mode" value="chat"> chat messages (JSON)</label>
  <select id="fill"><option value="">fill in a test prompt&hellip;</option></select></div>
<textarea id="prompt" rows="5" placeholder="The prompt, exactly as in training (include the separator), or a JSON list of {&quot;role&quot;, &quot;content&quot;} messages"></textarea>
<div class="bar">
  <label>max_new_tokens <input id="max_new_tokens" type="number" min="1" value="64"></label>
  <label>temperature <input id="temperature" type="number" min="0" step="any" value="0"></label>
  <label>top_p <input id="top_p" type="number" min="0" max="1" step="any" value="1"></label>
  <label>top_k <input id="top_k" type="number" min="0" value="0"></label>
  <label>seed <input id="seed" type="number" placeholder="run's"></label>
  <label>stop (one a line, \\n is a newline) <textarea id="stop" rows="1" cols="16"></textarea></label>
</div>
<div class="bar"><span>checkpoints:</span><span id="choices" class="bar"></span></div>
<button id="ask" type="submit">Ask</button> <span id="ask-error" class="error-box"></span>
</form>
<div id="results" class="results"></div>
"""


def render_page(poll_seconds: float) -> str:
    script = SCRIPT.replace("__POLL_MS__", str(max(250, int(poll_seconds * 1000))))
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<link rel="icon" href="data:,">'  # no /favicon.ico request (it would need the key)
        f"<title>Compare checkpoints</title><style>{REPORT_CSS}{EXTRA_CSS}</style></head><body>"
        f"{BODY}<script>{script}</script></body></html>\n"
    )
