// The odlora demo page: chat columns over /v1/chat/completions, adapters from /odlora/state,
// personalisation jobs through /odlora/jobs. Plain DOM, no libraries, nothing fetched from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";
const POLL_MS = 500;

const page = { models: ["base"], columns: [], watching: null, streaming: new Set() };

// -- talking to the server -----------------------------------------------------------------------

async function api(path, body) {
  const options = body === undefined ? {} :
    { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
  const response = await fetch(path, options);
  const data = await response.json();
  if (!response.ok) throw new Error(data.error ? data.error.message : `HTTP ${response.status}`);
  return data;
}

// Stream one chat answer (server-sent events in OpenAI's chunk format); onPiece sees the text as it
// comes; returns {text, tokens} (tokens: the usage chunk's count). `signal` aborts it (the Stop button):
// the server stops generating when the connection closes.
async function streamChat(model, messages, onPiece, signal) {
  const response = await fetch("/v1/chat/completions", {
    method: "POST", headers: { "Content-Type": "application/json" }, signal,
    body: JSON.stringify({ model, messages, stream: true, stream_options: { include_usage: true },
                           max_tokens: Number($("max-tokens").value), temperature: Number($("temperature").value) }),
  });
  if (!response.ok) throw new Error((await response.json()).error.message);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", text = "", tokens = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return { text, tokens };
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const data = buffer.slice(0, cut).replace(/^data: /, "");
      buffer = buffer.slice(cut + 2);
      if (data === "[DONE]") return { text, tokens };
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) tokens = chunk.usage.completion_tokens;
      if (!chunk.choices.length) continue; // the usage chunk
      const piece = chunk.choices[0].delta.content || "";
      text += piece;
      onPiece(piece);
    }
  }
}

// -- small DOM helpers ---------------------------------------------------------------------------

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

// An answer as text, with ``` fences as code blocks: the one piece of markdown worth rendering here.
// Built from text nodes only (no innerHTML), so nothing a model writes can become markup or script.
function renderAnswer(node, text) {
  const parts = text.split(/```/);
  node.replaceChildren(...parts.map((part, i) => {
    if (i % 2 === 0) return document.createTextNode(part);
    const code = el("code", "", part.replace(/^[\w+-]*\n/, "")); // drop the fence's language tag
    const pre = el("pre", "code");
    pre.append(code);
    return pre;
  }));
}

// Keep a scrolled box at its newest text, unless the reader has scrolled up to read.
function follow(box, update) {
  const atEnd = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
  update();
  if (atEnd) box.scrollTop = box.scrollHeight;
}

function fmtDuration(seconds) {
  const s = Math.max(0, Math.round(seconds));
  return s >= 60 ? `${Math.floor(s / 60)} min ${String(s % 60).padStart(2, "0")} s` : `${s} s`;
}

function fmtBytes(n) {
  if (n == null) return "–";
  return n >= 2 ** 20 ? `${(n / 2 ** 20).toFixed(1)} MB` : `${(n / 1024).toFixed(1)} kB`;
}

const fmtLoss = (x) => (x == null ? "–" : x.toFixed(3));
const fmtBeforeAfter = (a, b) => (b == null ? "–" : `${fmtLoss(a)} → ${fmtLoss(b)}`);

function fmtExact(score) {
  if (!score) return "–";
  return `${score.base.toFixed(2)} → ${score.adapter.toFixed(2)} (${score.task}, ${score.examples})`;
}

function fillSelect(select, values, keep) {
  select.replaceChildren(...values.map((v) => Object.assign(el("option", "", v), { value: v })));
  if (values.includes(keep)) select.value = keep;
}

// -- the server's state: export, adapters, samples -----------------------------------------------

async function refresh() {
  const state = await api("/odlora/state");
  const e = state.export;
  $("export-info").textContent =
    `${e.base} · ${e.target} export (${e.quant}), ${e.backend} backend · slots r≤${e.max_rank} · ${e.max_seq_len}-token context`;
  $("job-rank").max = e.max_rank;
  page.models = ["base", ...state.adapters.map((a) => a.id)];
  for (const column of page.columns) fillSelect(column.select, page.models, column.select.value);
  $("adapter-rows").replaceChildren(...state.adapters.map(adapterRow));
  if (!$("job-sample").options.length) fillSelect($("job-sample"), state.samples);
  return state;
}

function adapterRow(a) {
  const row = el("tr");
  row.dataset.adapter = a.id;
  for (const [key, text] of [["id", a.id], ["rank", a.rank], ["size", fmtBytes(a.size)],
                             ["val", fmtBeforeAfter(a.val_loss_before, a.val_loss)], ["exact", fmtExact(a.exact_match)]]) {
    const cell = el("td", "", String(text));
    cell.dataset.field = key;
    row.append(cell);
  }
  const remove = el("button", "delete", "×");
  remove.type = "button";
  remove.title = `stop serving ${a.id} (and delete it, if this page trained it)`;
  remove.onclick = () => deleteAdapter(a.id);
  const cell = el("td");
  cell.append(remove);
  row.append(cell);
  return row;
}

async function deleteAdapter(id) {
  if (!window.confirm(`Stop serving ${id}? An adapter this page trained is deleted from the server's disk.`)) return;
  const response = await fetch(`/odlora/adapters/${encodeURIComponent(id)}`, { method: "DELETE" });
  if (!response.ok) window.alert((await response.json()).error.message);
  await refresh();
}

// -- chat columns --------------------------------------------------------------------------------

function addColumn(model) {
  const column = { messages: [], select: el("select", "model"), transcript: el("div", "transcript"), node: el("div", "column") };
  fillSelect(column.select, page.models, model);
  const clear = el("button", "clear", "Clear");
  clear.type = "button";
  clear.onclick = () => { column.messages = []; column.transcript.replaceChildren(); };
  const remove = el("button", "remove", "×");
  remove.type = "button";
  remove.title = "remove this column";
  remove.onclick = () => { column.node.remove(); page.columns.splice(page.columns.indexOf(column), 1); };
  const head = el("div", "column-head");
  head.append(column.select, clear, remove);
  column.node.append(head, column.transcript);
  $("columns").append(column.node);
  page.columns.push(column);
}

// One turn in one column, answered by the model picked there now (so each message may use another adapter).
async function ask(column, text) {
  const model = column.select.value;
  column.messages.push({ role: "user", content: text });
  const answer = el("div", "msg assistant");
  answer.dataset.state = "streaming";
  answer.dataset.model = model;
  const body = el("div", "text"), stats = el("span", "stats"), stop = el("button", "stop", "Stop");
  stop.type = "button";
  const meta = el("div", "meta", model);
  meta.append(stats, stop);
  answer.append(meta, body);
  follow(column.transcript, () => column.transcript.append(el("div", "msg user", text), answer));
  const aborter = new AbortController();
  stop.onclick = () => aborter.abort();
  page.streaming.add(aborter);
  const started = performance.now();
  let shown = "";
  try {
    const reply = await streamChat(model, column.messages, (piece) => {
      shown += piece;
      follow(column.transcript, () => renderAnswer(body, shown));
    }, aborter.signal);
    column.messages.push({ role: "assistant", content: reply.text });
    answer.dataset.state = "done";
    const seconds = (performance.now() - started) / 1000;
    if (reply.tokens) stats.textContent = ` · ${reply.tokens} tokens, ${(reply.tokens / seconds).toFixed(1)} tokens/s`;
  } catch (error) {
    if (aborter.signal.aborted) { // stopped: what came so far stays in the conversation
      column.messages.push({ role: "assistant", content: shown });
      answer.dataset.state = "stopped";
      stats.textContent = " · stopped";
    } else {
      column.messages.pop(); // the turn failed: the conversation stays as it was
      body.textContent = error.message;
      answer.dataset.state = "error";
    }
  } finally {
    page.streaming.delete(aborter);
    stop.remove();
  }
}

async function send(event) {
  event.preventDefault();
  const text = $("message").value.trim();
  if (!text || !page.columns.length) return;
  $("message").value = "";
  $("send").disabled = true;
  $("stop-all").disabled = false;
  try {
    await Promise.all(page.columns.map((column) => ask(column, text)));
  } finally {
    $("send").disabled = false;
    $("stop-all").disabled = true;
  }
}

// -- personalisation -----------------------------------------------------------------------------

function showSource() {
  const source = $("job-source").value;
  for (const label of document.querySelectorAll("[data-source]")) label.hidden = label.dataset.source !== source;
}

async function jobRequest() {
  const body = { name: $("job-name").value.trim(), steps: Number($("job-steps").value), rank: Number($("job-rank").value),
                 eval_examples: Number($("job-eval").value) };
  const source = $("job-source").value;
  if (source === "sample") body.sample = $("job-sample").value;
  if (source === "path") body.path = $("job-path").value.trim();
  if (source === "upload") {
    const file = $("job-file").files[0];
    if (!file) throw new Error("choose a file to upload");
    body.upload = { filename: file.name, text: await file.text() };
  }
  return body;
}

async function startJob(event) {
  event.preventDefault();
  $("job-error").hidden = true;
  try {
    const job = await api("/odlora/jobs", await jobRequest());
    watch(job);
  } catch (error) {
    $("job-error").textContent = error.message;
    $("job-error").hidden = false;
  }
}

async function cancelJob() {
  if (page.watching) await api(`/odlora/jobs/${page.watching}/cancel`, {});
}

const FINISHED = ["done", "failed", "cancelled"];

function watch(job) {
  page.watching = job.id;
  $("job-start").disabled = true;
  $("job-cancel").hidden = false;
  showJob(job);
  const poll = async () => {
    if (page.watching !== job.id) return;
    const now = await api(`/odlora/jobs/${job.id}`);
    showJob(now);
    if (!FINISHED.includes(now.state)) {
      setTimeout(poll, POLL_MS);
      return;
    }
    $("job-start").disabled = false;
    $("job-cancel").hidden = true;
    if (now.state === "done") await refresh();
  };
  setTimeout(poll, POLL_MS);
}

function showJob(job) {
  $("job").hidden = false;
  const progress = $("job-progress");
  progress.max = job.total;
  progress.value = job.state === "done" ? job.total : job.step;
  $("job-state").textContent = `${job.name}: ${job.state}, step ${job.step}/${job.total}`;
  $("job-state").dataset.state = job.state;
  const last = (series) => (series.length ? series[series.length - 1][1] : null);
  const left = job.state === "training" && job.step > 0 ? job.seconds / job.step * (job.total - job.step) : null;
  $("job-stats").textContent = `loss ${fmtLoss(last(job.loss))} · validation loss ${fmtLoss(last(job.val))} · ` +
    `${Math.round(job.tokens_per_s)} tokens/s · ${fmtDuration(job.seconds)}` +
    (left === null ? "" : ` · about ${fmtDuration(left)} left`);
  drawChart($("loss-chart"), job.loss, job.val);
  $("job-log").textContent = job.messages.join("\n");
  $("job-result").textContent = job.error ? `failed: ${job.error}` : job.adapter ? adapterSummary(job.adapter) : "";
  $("job-result").className = job.error ? "error" : "";
}

function adapterSummary(a) {
  const exact = a.exact_match ? `, exact match ${fmtExact(a.exact_match)}` : "";
  return `${a.id} is served: rank ${a.rank}, ${fmtBytes(a.size)} packed, validation loss ` +
    `${fmtBeforeAfter(a.val_loss_before, a.val_loss)}${exact}`;
}

// Training loss (a line) and validation loss (a line with points) against the step, with both axes
// ticked and named.
function drawChart(chart, loss, val) {
  const [W, H, left, bottom, pad] = [360, 190, 42, 34, 8];
  const points = [...loss, ...val];
  chart.replaceChildren(svg("line", { class: "axis", x1: left, y1: pad, x2: left, y2: H - bottom }),
                        svg("line", { class: "axis", x1: left, y1: H - bottom, x2: W - pad, y2: H - bottom }),
                        svg("text", { class: "title", x: (left + W) / 2, y: H - 2, "text-anchor": "middle" }, "step"),
                        svg("text", { class: "title", x: 10, y: (H - bottom) / 2, "text-anchor": "middle",
                                      transform: `rotate(-90 10 ${(H - bottom) / 2})` }, "loss"));
  if (!points.length) return;
  const maxStep = Math.max(1, ...points.map((p) => p[0]));
  const lo = Math.min(...points.map((p) => p[1])), hi = Math.max(...points.map((p) => p[1]));
  const span = hi - lo || 1;
  const x = (step) => left + (step / maxStep) * (W - left - pad);
  const y = (value) => pad + (1 - (value - lo) / span) * (H - bottom - pad);
  const line = (series) => series.map((p) => `${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join(" ");
  const ticks = [0, 0.5, 1];
  chart.append(...ticks.map((f) => svg("text", { class: "tick", x: left - 4, y: y(lo + f * span) + 3, "text-anchor": "end" },
                                       (lo + f * span).toFixed(2))),
               ...ticks.map((f) => svg("text", { class: "tick", x: x(Math.round(f * maxStep)), y: H - bottom + 12,
                                                 "text-anchor": "middle" }, String(Math.round(f * maxStep)))),
               svg("polyline", { class: "train", points: line(loss) }), svg("polyline", { class: "val", points: line(val) }),
               ...val.map((p) => svg("circle", { class: "val-point", cx: x(p[0]), cy: y(p[1]), r: 2.5 })));
}

// -- start ---------------------------------------------------------------------------------------

async function main() {
  $("add-column").onclick = () => addColumn("base");
  $("send-form").onsubmit = send;
  $("message").onkeydown = (e) => { if (e.key === "Enter" && !e.shiftKey) send(e); };
  $("job-source").onchange = showSource;
  $("job-form").onsubmit = startJob;
  $("job-cancel").onclick = cancelJob;
  $("stop-all").onclick = () => { for (const aborter of page.streaming) aborter.abort(); };
  const state = await refresh();
  addColumn("base");
  addColumn(page.models[1] || "base");
  if (state.job && !FINISHED.includes(state.job.state)) watch(state.job);
  document.body.dataset.ready = "true";
}

main().catch((error) => { $("export-info").textContent = `cannot reach the server: ${error.message}`; });
