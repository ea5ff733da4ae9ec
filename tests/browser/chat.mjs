#!/usr/bin/env node
// Drives the node's web UI in a real (headless) Chromium, as a person would:
//
//   node chat.mjs <base-url> <screenshot-path> <expected-node-ids comma-separated>
//   node chat.mjs http://127.0.0.1:52415 /tmp/ui.png mac1,mac2
//
// Opens <base-url>/, waits until every expected node's card shows its link up
// (or "self") and a layer range, sends a prompt, checks that the answer streams
// in (grows over at least two observations before the stream ends), that it
// ends without an error, saves a full-page screenshot and prints a one-line
// JSON summary. Fails (exit 1, message on stderr) on any problem, on an
// uncaught error in the page, or when the page requests anything from another
// origin than <base-url>'s. Everything is bounded: 120 s in all.
//
// Uses Debian's Chromium (/usr/bin/chromium, or $CHROMIUM_PATH): playwright's
// own browser download is not available here. scripts/browser-test installs it.

import { mkdtempSync, rmSync, mkdirSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { chromium } from "playwright-core";

const TOTAL_MS = 120_000;           // the whole run
const CLUSTER_READY_MS = 60_000;    // nodes linked, layers assigned
const STREAM_MS = 90_000;           // send -> end of stream
const PROMPT = "Write one sentence about the sea.";
const CHROMIUM = process.env.CHROMIUM_PATH || "/usr/bin/chromium";

const [baseArg, shotArg, idsArg] = process.argv.slice(2);
if (!baseArg || !shotArg || !idsArg) {
  console.error("usage: node chat.mjs <base-url> <screenshot-path> <expected-node-ids comma-separated>");
  process.exit(2);
}
let base;
try {
  base = new URL(baseArg);
} catch {
  console.error(`chat.mjs: not a URL: ${baseArg}`);
  process.exit(2);
}
const origin = base.origin;
const pageUrl = new URL("/", base).href;
const shotPath = resolve(shotArg);
const expectedIds = idsArg.split(",").map((s) => s.trim()).filter(Boolean);
if (expectedIds.length === 0) {
  console.error("chat.mjs: no expected node ids given");
  process.exit(2);
}

const t0 = Date.now();
const elapsed = () => ((Date.now() - t0) / 1000).toFixed(1) + "s";
let context = null;
let userDataDir = null;
const foreign = [];      // requests to other origins
const pageErrors = [];   // uncaught exceptions in the page
const consoleErrors = [];

async function cleanup() {
  if (context) {
    const c = context;
    context = null;
    await Promise.race([c.close().catch(() => {}), new Promise((r) => setTimeout(r, 5000))]);
  }
  if (userDataDir) {
    rmSync(userDataDir, { recursive: true, force: true });
    userDataDir = null;
  }
}

async function fail(msg) {
  console.error(`browser test FAILED after ${elapsed()}: ${msg}`);
  if (consoleErrors.length) console.error("page console errors:\n  " + consoleErrors.slice(0, 10).join("\n  "));
  await cleanup();
  process.exit(1);
}

const watchdog = setTimeout(() => {
  fail(`did not finish within ${TOTAL_MS / 1000} s`);
}, TOTAL_MS);

function checkHealth() {
  if (foreign.length) throw new Error(`the page requested another origin than ${origin}: ${foreign.slice(0, 5).join(", ")}`);
  if (pageErrors.length) throw new Error(`uncaught error in the page: ${pageErrors[0]}`);
}

// Reads the cluster pane as the page shows it (for waiting and for messages).
function readCluster() {
  const cards = [...document.querySelectorAll(".node-card[data-node-id]")].map((c) => ({
    id: c.dataset.nodeId,
    link: c.dataset.link,
    layers: c.dataset.layers,
    layersText: (c.querySelector(".layers-text")?.textContent || "").trim(),
  }));
  const p = document.querySelector("#cluster-problem-text") || document.querySelector("#cluster-problem");
  const u = document.querySelector("#cluster-unreachable");
  return {
    cards,
    problem: p && !p.closest("[hidden]") ? p.textContent.trim() : null,
    unreachable: !!(u && !u.hidden),
  };
}

function clusterReady(state, ids) {
  if (state.problem || state.unreachable) return false;
  return ids.every((id) => {
    const c = state.cards.find((x) => x.id === id);
    return c && (c.link === "up" || c.link === "self") && /^\d+-\d+$/.test(c.layers || "") && /layers \d+/.test(c.layersText);
  });
}

async function main() {
  userDataDir = mkdtempSync(join(tmpdir(), "tensorlink-ui-"));
  try {
    context = await chromium.launchPersistentContext(userDataDir, {
      executablePath: CHROMIUM,
      headless: true,
      args: [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
      ],
      viewport: { width: 1280, height: 800 },
      deviceScaleFactor: 1,
      timeout: 30_000,
    });
  } catch (e) {
    throw new Error(`could not start Chromium at ${CHROMIUM} (scripts/browser-test installs it): ${e.message.split("\n")[0]}`);
  }

  const page = context.pages()[0] || (await context.newPage());
  const watch = (p) => {
    p.on("request", (req) => {
      const url = req.url();
      if (url.startsWith("data:")) return; // inline (the favicon), not a network request
      let o;
      try { o = new URL(url).origin; } catch { o = null; }
      if (o !== origin) foreign.push(url);
    });
    p.on("pageerror", (err) => pageErrors.push(String(err && err.message ? err.message : err)));
    p.on("console", (m) => { if (m.type() === "error") consoleErrors.push(m.text()); });
  };
  context.on("page", watch);
  for (const p of context.pages()) watch(p);

  // 1. The page loads.
  const resp = await page.goto(pageUrl, { waitUntil: "load", timeout: 30_000 }).catch((e) => {
    throw new Error(`could not open ${pageUrl}: ${e.message.split("\n")[0]}`);
  });
  if (!resp || !resp.ok()) throw new Error(`GET ${pageUrl} answered ${resp ? resp.status() : "nothing"}`);
  const ctype = resp.headers()["content-type"] || "";
  if (!ctype.startsWith("text/html")) throw new Error(`GET / has content-type "${ctype}", want text/html`);
  for (const sel of ["#prompt", "#send", "#stop", "#cluster-problem"]) {
    if ((await page.locator(sel).count()) !== 1) throw new Error(`the page has no ${sel}`);
  }

  // 2. Every expected node is linked and holds a slice of the model.
  try {
    // (The page's CSP forbids eval, so the helpers go in through evaluate.)
    await page.evaluate(`window.__readCluster = ${readCluster}; window.__clusterReady = ${clusterReady};`);
    await page.waitForFunction(
      (ids) => window.__clusterReady(window.__readCluster(), ids),
      expectedIds,
      { timeout: CLUSTER_READY_MS, polling: 250 },
    );
  } catch {
    const s = await page.evaluate(readCluster).catch(() => null);
    const seen = s ? s.cards.map((c) => `${c.id}(link=${c.link}, layers=${c.layers || "none"})`).join(", ") || "no node cards" : "page not readable";
    const extra = s && s.problem ? `; problem shown: "${s.problem}"` : s && s.unreachable ? "; the page shows the node as unreachable" : "";
    throw new Error(`cluster not ready within ${CLUSTER_READY_MS / 1000} s: want ${expectedIds.join(",")} linked with layers, saw ${seen}${extra}`);
  }
  checkHealth();
  const cluster = await page.evaluate(readCluster);

  // 3. Record how the answer grows: a MutationObserver sees every DOM update,
  //    however fast the tokens come (polling from here could miss them).
  await page.evaluate(() => {
    const rec = (window.__uiTest = { clickAt: null, obs: [], states: [] });
    const messages = document.querySelector("#messages");
    const look = () => {
      const all = messages.querySelectorAll(".message.assistant");
      const m = all[all.length - 1];
      if (!m) return;
      const body = m.querySelector(".body");
      const len = (body ? body.textContent : m.textContent).length;
      const state = m.dataset.state || "";
      const last = rec.obs[rec.obs.length - 1];
      if (!last || last.len !== len || last.state !== state) rec.obs.push({ t: performance.now(), len, state });
    };
    new MutationObserver(look).observe(messages, { childList: true, subtree: true, characterData: true, attributes: true, attributeFilter: ["data-state"] });
    document.querySelector("#send").addEventListener("click", () => { rec.clickAt = performance.now(); }, { capture: true });
  });

  // 4. Ask.
  if (await page.locator(".message.assistant").count()) throw new Error("an answer is on the page before anything was asked");
  await page.locator("#prompt").fill(PROMPT);
  await page.locator("#send").click();

  // 5. Wait for the end of the stream (done, stopped or error).
  try {
    await page.waitForFunction(
      () => {
        const err = document.querySelector(".message.error");
        if (err) return true;
        const all = document.querySelectorAll(".message.assistant");
        const m = all[all.length - 1];
        return !!m && m.dataset.state && m.dataset.state !== "streaming";
      },
      null,
      { timeout: STREAM_MS, polling: 100 },
    );
  } catch {
    const partial = await page.evaluate(() => {
      const all = document.querySelectorAll(".message.assistant .body");
      return all.length ? all[all.length - 1].textContent : null;
    }).catch(() => null);
    throw new Error(`the answer did not finish within ${STREAM_MS / 1000} s (received so far: ${partial === null ? "no answer element" : JSON.stringify(partial.slice(0, 200))})`);
  }
  checkHealth();

  const result = await page.evaluate(() => {
    const errs = [...document.querySelectorAll(".message.error")].map((e) =>
      [...e.children].map((c) => c.textContent.trim()).filter(Boolean).join(" | ").replace(/\s+/g, " "));
    const all = document.querySelectorAll(".message.assistant");
    const m = all[all.length - 1];
    return {
      errors: errs,
      state: m ? m.dataset.state : null,
      text: m ? m.querySelector(".body").textContent : "",
      tokens: m ? Number(m.dataset.tokens || 0) : 0,
      finish: m ? m.dataset.finishReason || null : null,
      meta: m ? (m.querySelector(".meta")?.textContent || "") : "",
      rec: window.__uiTest,
    };
  });
  if (result.errors.length) throw new Error(`the page shows an error: ${result.errors[0]}`);
  if (result.state !== "done") throw new Error(`the answer ended in state "${result.state}", want "done"`);
  if (!result.text.trim()) throw new Error("the answer is empty");

  // Observations of a non-empty, growing answer while it was still streaming.
  const growing = [];
  for (const o of result.rec.obs) {
    if (o.state !== "streaming" || o.len === 0) continue;
    if (!growing.length || o.len > growing[growing.length - 1].len) growing.push(o);
  }
  if (growing.length < 2) {
    throw new Error(`the answer did not stream: it grew over ${growing.length} observation(s) before the end (want at least 2); ${result.text.length} chars`);
  }
  const clickAt = result.rec.clickAt ?? result.rec.obs[0]?.t ?? growing[0].t;
  const ttft = Math.round(growing[0].t - clickAt);
  const endObs = result.rec.obs.find((o) => o.state && o.state !== "streaming");
  const streamMs = endObs ? Math.round(endObs.t - clickAt) : null;

  // 6. Screenshot.
  await page.mouse.move(1, 1); // no hover highlight on Send
  await page.evaluate(() => { document.activeElement && document.activeElement.blur(); });
  mkdirSync(dirname(shotPath), { recursive: true });
  await page.screenshot({ path: shotPath, fullPage: true, animations: "disabled", caret: "hide" });
  checkHealth();

  const summary = {
    ok: true,
    chars: result.text.length,
    tokens: result.tokens,
    observations: growing.length,
    ttft_ms: ttft,
    stream_ms: streamMs,
    finish_reason: result.finish,
    nodes_seen: cluster.cards.map((c) => ({ id: c.id, link: c.link, layers: c.layers })),
    screenshot: shotPath,
    elapsed_s: Number(((Date.now() - t0) / 1000).toFixed(1)),
  };
  console.log(JSON.stringify(summary));
}

try {
  await main();
  clearTimeout(watchdog);
  await cleanup();
  process.exit(0);
} catch (e) {
  clearTimeout(watchdog);
  await fail(e && e.message ? e.message : String(e));
}
