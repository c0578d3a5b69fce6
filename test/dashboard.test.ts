/**
 * The dashboard in a real browser (headless Chromium through playwright-core) against a
 * real `weft server` on a temp SQLite file: the runs table and its live updates, a run's
 * page (task runs, logs, Cancel), the flows and agents pages, the Run form with its
 * parameters, text that must stay text,
 * the feed coming back after a server restart, and the token form.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chromium, type Browser, type Page } from 'playwright-core';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { openDb } from '../src/server/db.ts';
import { startServer, type RunningServer } from '../src/server/index.ts';
import { Store } from '../src/server/store.ts';
import { registerFixture } from './fixtures/deploy/harness.ts';

// The page's globals, in the functions run inside it (this project's TS has no DOM lib;
// string expressions would need 'unsafe-eval', which the dashboard's CSP refuses).
declare const document: any;
declare const window: any;
declare const location: any;

const CHROMIUM_ARGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  '--no-first-run',
  '--disable-quic',
];
const TOKEN = 'dash-tok-41c9';
const XSS = '<img src=x onerror="window.__xss=1">';
const until = { timeout: 10_000, interval: 50 };

let tmp: string;
let open: RunningServer;
let locked: RunningServer;
let browser: Browser;

/** A page in a fresh context (its own storage) that records script errors and CSP reports. */
async function newPage(): Promise<{ page: Page; problems: string[] }> {
  const context = await browser.newContext();
  const page = await context.newPage();
  const problems: string[] = [];
  page.on('pageerror', (err) => problems.push(`pageerror: ${err.message}`));
  page.on('console', (m) => {
    if (m.type() === 'error' && /Content Security Policy|Refused to/i.test(m.text())) problems.push(`csp: ${m.text()}`);
  });
  return { page, problems };
}

const rowIds = (page: Page): Promise<string[]> =>
  page.$$eval('#runs-table tbody tr[data-run]', (rows) => rows.map((r) => r.getAttribute('data-run') ?? ''));
const text = async (page: Page, selector: string): Promise<string> => (await page.locator(selector).first().textContent()) ?? '';
const waitLive = (page: Page): Promise<unknown> => page.waitForFunction(() => document.getElementById('feed')?.textContent === 'live', null, { timeout: 10_000 });

describe('the dashboard', () => {
  beforeAll(async () => {
    tmp = await mkdtemp(join(tmpdir(), 'weft-dashboard-'));
    open = await startServer({ db: `sqlite:${join(tmp, 'open.db')}`, port: 0, services: false });
    locked = await startServer({ db: `sqlite:${join(tmp, 'locked.db')}`, port: 0, services: false, token: TOKEN });
    browser = await chromium.launch({ executablePath: '/usr/bin/chromium', headless: true, args: CHROMIUM_ARGS });
  });

  afterAll(async () => {
    await browser?.close();
    await open?.close();
    await locked?.close();
    if (tmp !== undefined) await rm(tmp, { recursive: true, force: true });
  });

  it('is served at /ui/ without a token, with security headers; / redirects there; the API still needs the token', async () => {
    const root = await fetch(`${locked.url}/`, { redirect: 'manual' });
    expect(root.status).toBe(302);
    expect(root.headers.get('location')).toBe('/ui/');
    const html = await fetch(`${locked.url}/ui/`);
    expect(html.status).toBe(200);
    expect(html.headers.get('content-type')).toMatch(/^text\/html/);
    const csp = html.headers.get('content-security-policy') ?? '';
    expect(csp).toContain("default-src 'self'");
    expect(csp).toContain("script-src 'self'");
    expect(csp).toMatch(/connect-src 'self' ws:\/\/127\.0\.0\.1:\d+/);
    expect(html.headers.get('x-content-type-options')).toBe('nosniff');
    const body = await html.text();
    expect(body).toContain('<script type="module" src="/ui/app.js"></script>');
    // No inline script and nothing from another origin.
    expect(body).not.toMatch(/<script>|<script [^>]*>[^<]/);
    expect(body).not.toMatch(/https?:\/\//);
    expect((await fetch(`${locked.url}/ui/app.js`)).headers.get('content-type')).toMatch(/^text\/javascript/);
    expect((await fetch(`${locked.url}/ui/style.css`)).status).toBe(200);
    expect((await fetch(`${locked.url}/ui/nope.js`)).status).toBe(404);
    expect((await fetch(`${locked.url}/ui/`, { method: 'POST' })).status).toBe(405);
    expect((await fetch(`${locked.url}/api/flow-runs`)).status).toBe(401);
  });

  it('lists flow runs newest first and shows changes made through the API without a reload', async () => {
    const s = open.store;
    const v = await registerFixture(s, 'ok.ts', 'deploy-ok', { project: 'dash' });
    const older = await s.createFlowRun({ flowId: v.flowId, scheduledStart: Date.now() - 60_000 });
    const newer = await s.createFlowRun({ flowId: v.flowId });
    const { page, problems } = await newPage();
    await page.goto(`${open.url}/`);
    expect(new URL(page.url()).pathname).toBe('/ui/');
    await vi.waitFor(async () => expect(await rowIds(page)).toEqual([newer.id, older.id]), until);
    const row = `#runs-table tr[data-run="${older.id}"]`;
    expect(await text(page, `${row} td.flow`)).toBe('deploy-ok dash');
    expect(await text(page, `${row} .state`)).toBe('Scheduled');
    await waitLive(page);
    await page.evaluate(() => (window.__kept = 1));

    await s.setFlowRunState(older.id, 'Running', { message: 'picked up by the test' });
    await vi.waitFor(async () => expect(await text(page, `${row} .state`)).toBe('Running'), until);
    expect(await text(page, `${row} td.msg`)).toBe('picked up by the test');
    const third = await s.createFlowRun({ flowId: v.flowId, scheduledStart: Date.now() + 60_000 });
    await vi.waitFor(async () => expect(await rowIds(page)).toEqual([third.id, newer.id, older.id]), until);

    // The state filter keeps applying to live events: a run that enters the state shows up.
    await page.selectOption('#state-filter', 'Running');
    await vi.waitFor(async () => expect(await rowIds(page)).toEqual([older.id]), until);
    await waitLive(page);
    await s.setFlowRunState(newer.id, 'Running');
    await vi.waitFor(async () => expect(await rowIds(page)).toEqual([newer.id, older.id]), until);
    await s.setFlowRunState(older.id, 'Success');
    await vi.waitFor(async () => expect(await rowIds(page)).toEqual([newer.id]), until);

    expect(await page.evaluate(() => window.__kept)).toBe(1);
    expect(problems).toEqual([]);
    await page.context().close();
  });

  it("a run's page shows its parameters, history, task runs and logs, live", async () => {
    const s = open.store;
    const v = await registerFixture(s, 'ok.ts', 'deploy-ok', { project: 'dash' });
    const run = await s.createFlowRun({ flowId: v.flowId, parameters: { n: 5 }, scheduledStart: Date.now() + 3_600_000 });
    await s.setFlowRunState(run.id, 'Running');
    const t0 = Date.now() - 5_000;
    await s.setTaskRunStates(run.id, 'proc-1', [
      { key: 'extract', mapIndex: -1, state: 'Success', expectVersion: 0, attempts: 1, startedAt: t0, endedAt: t0 + 1500 },
      { key: 'load', mapIndex: 0, state: 'Retrying', expectVersion: 0, attempts: 2, startedAt: t0 + 2000, message: 'connection reset' },
    ]);
    await s.writeLogs([
      { flowRunId: run.id, level: 'info', message: 'flow run started', at: t0, source: 'flow-run' },
      { flowRunId: run.id, taskKey: 'load', mapIndex: 0, level: 'warn', message: 'retrying load', at: t0 + 2100, source: 'task' },
    ]);

    const { page, problems } = await newPage();
    await page.goto(`${open.url}/ui/`);
    await page.click(`#runs-table tr[data-run="${run.id}"] td:first-child a`);
    await vi.waitFor(async () => expect(await page.locator('#task-runs tbody tr[data-task]').count()).toBe(2), until);
    expect(new URL(page.url()).hash).toBe(`#/runs/${run.id}`);
    const rows = await page.$$eval('#task-runs tbody tr[data-task]', (trs) => trs.map((tr) => [...tr.children].map((td) => td.textContent)));
    expect(rows[0]).toEqual(['extract', '—', 'Success', '1', '1.5 s', '']);
    expect(rows[1]?.slice(0, 4)).toEqual(['load', '0', 'Retrying', '2']);
    expect(rows[1]?.[5]).toBe('connection reset');
    await vi.waitFor(async () => expect(await text(page, '#run-logs')).toContain('retrying load'), until);
    expect(await text(page, '#run-logs')).toContain('flow run started');
    expect(await text(page, '#run-logs')).toContain('load[0]');
    expect(JSON.parse(await text(page, '#run-parameters'))).toEqual({ n: 5 });
    const history = await page.$$eval('#run-history tbody .state', (els) => els.map((e) => e.textContent));
    expect(history).toEqual(['Scheduled', 'Running']);

    await waitLive(page);
    await s.writeLogs([{ flowRunId: run.id, level: 'error', message: 'load failed for good', at: Date.now(), source: 'task' }]);
    await s.setTaskRunStates(run.id, 'proc-1', [{ key: 'load', mapIndex: 0, state: 'Failed', expectVersion: 1, attempts: 3, endedAt: Date.now() }]);
    await s.setFlowRunState(run.id, 'Failed', { message: 'a task failed' });
    await vi.waitFor(async () => expect(await text(page, '#run-logs')).toContain('load failed for good'), until);
    await vi.waitFor(async () => expect(await text(page, '#task-runs tr[data-task="load"] .state')).toBe('Failed'), until);
    await vi.waitFor(async () => expect(await page.$$eval('#run-history tbody .state', (els) => els.length)).toBe(3), until);
    expect(await text(page, '#run-facts .state')).toBe('Failed');
    // An ended run has nothing to cancel.
    expect(await page.locator('#cancel-run').count()).toBe(0);
    // Run again: a new run of the same version with the same parameters, and its page.
    await page.click('#run-again');
    await page.waitForFunction((old) => /^#\/runs\/[^/]+$/.test(location.hash) && location.hash !== old, `#/runs/${run.id}`);
    const again = await s.getFlowRun(decodeURIComponent(new URL(page.url()).hash.slice('#/runs/'.length)));
    expect(again).toMatchObject({ flowId: v.flowId, versionId: run.versionId, parameters: { n: 5 }, state: 'Scheduled' });
    await vi.waitFor(async () => expect(await text(page, '#run-facts .state')).toBe('Scheduled'), until);
    await vi.waitFor(async () => expect(await text(page, '#run-logs')).toBe('No logs yet'), until);
    expect(problems).toEqual([]);
    await page.context().close();
  });

  it('Cancel on a Scheduled run cancels it on the server; Run and Pause schedule on the flows page; agents are listed', async () => {
    const s = open.store;
    const v = await registerFixture(s, 'trivial.ts', 'deploy-trivial', { project: 'dash' });
    const run = await s.createFlowRun({ flowId: v.flowId, scheduledStart: Date.now() + 3_600_000 });
    const { page, problems } = await newPage();
    await page.goto(`${open.url}/ui/#/runs/${run.id}`);
    await page.waitForSelector('#cancel-run');
    expect(await text(page, '#run-facts .state')).toBe('Scheduled');
    page.once('dialog', (d) => void d.accept());
    await page.click('#cancel-run');
    await vi.waitFor(async () => expect((await s.getFlowRun(run.id)).state).toBe('Cancelled'), until);
    await vi.waitFor(async () => expect(await text(page, '#run-facts .state')).toBe('Cancelled'), until);
    expect(await page.locator('#cancel-run').count()).toBe(0);

    await page.goto(`${open.url}/ui/#/flows`);
    const flowRow = `#flows-table tr[data-flow="${v.flowId}"]`;
    await page.waitForSelector(flowRow);
    expect(await text(page, `${flowRow} td.name`)).toBe('deploy-trivial');
    // Run opens the form; submitted as prefilled, the run takes the version's defaults.
    await page.click(`${flowRow} button.run-flow`);
    await page.waitForSelector('#run-form [data-param="i"] input');
    expect(await page.inputValue('#run-form [data-param="i"] input')).toBe('0');
    await page.click('#run-submit');
    await page.waitForFunction((old) => /^#\/runs\/[^/]+$/.test(location.hash) && location.hash !== old, `#/runs/${run.id}`);
    const created = decodeURIComponent(new URL(page.url()).hash.slice('#/runs/'.length));
    const onServer = await s.getFlowRun(created);
    expect(onServer).toMatchObject({ flowId: v.flowId, state: 'Scheduled', parameters: {} });
    await vi.waitFor(async () => expect(await text(page, '#run-facts .state')).toBe('Scheduled'), until);

    // A scheduled flow: its clock is shown, and its schedule can be paused from the page.
    const { flow: nightly } = await s.registerFlow({
      project: 'dash',
      name: 'nightly',
      graph: null,
      storage: { kind: 'module', specifier: './nightly.ts', flow: 'nightly' },
      runConfig: { kind: 'universal' },
      executor: { kind: 'local' },
      parameters: [],
      labels: [],
      schedule: { clocks: [{ kind: 'cron', cron: '0 3 * * *' }] },
    });
    const nightlyRow = `#flows-table tr[data-flow="${nightly.id}"]`;
    await page.goto(`${open.url}/ui/#/flows?project=dash`);
    await vi.waitFor(async () => expect(await text(page, `${nightlyRow} td:nth-child(4)`)).toBe('cron 0 3 * * *'), until);
    await page.click(`${nightlyRow} button:has-text("Pause schedule")`);
    await vi.waitFor(async () => expect((await s.getFlow(nightly.id)).schedule?.paused).toBe(true), until);
    await vi.waitFor(async () => expect(await text(page, `${nightlyRow} td:nth-child(4)`)).toBe('cron 0 3 * * * (paused)'), until);
    expect(await page.locator(`${nightlyRow} button:has-text("Resume schedule")`).count()).toBe(1);

    await s.registerAgent({ name: 'agent-dash', kind: 'docker', labels: ['etl', 'gpu'] });
    await page.goto(`${open.url}/ui/#/agents`);
    await page.waitForSelector('#agents-table tr[data-agent]');
    const cells = await page.$$eval('#agents-table tr[data-agent] td', (tds) => tds.map((td) => td.textContent));
    expect(cells.slice(0, 3)).toEqual(['agent-dash', 'docker', 'etl, gpu']);
    expect(cells[3]).toMatch(/ago$/);
    expect(cells[4]).toBe('healthy');
    expect(problems).toEqual([]);
    await page.context().close();
  });

  it('Run asks for the parameters: required ones marked and checked before sending, a 400 kept in the form, the run made with exactly the values given', async () => {
    const s = open.store;
    const { flow } = await s.registerFlow({
      project: 'params',
      name: 'report',
      graph: null,
      storage: { kind: 'module', specifier: './report.ts', flow: 'report' },
      runConfig: { kind: 'universal' },
      executor: { kind: 'local' },
      parameters: [
        { name: 'target', required: true },
        { name: 'rows', required: false, default: 3 },
        { name: 'note', required: false, default: XSS },
      ],
      labels: ['base'],
    });
    const runsOfFlow = async (): Promise<unknown[]> => (await (await fetch(`${open.url}/api/flow-runs?flowId=${flow.id}`)).json()) as unknown[];
    const { page, problems } = await newPage();
    let posts = 0;
    page.on('request', (r) => {
      if (r.method() === 'POST' && new URL(r.url()).pathname === '/api/flow-runs') posts++;
    });
    await page.goto(`${open.url}/ui/#/flows?project=params`);
    await page.click(`#flows-table tr[data-flow="${flow.id}"] button.run-flow`);
    const target = '#run-form [data-param="target"]';
    await page.waitForSelector(`${target} input`);

    // Prefilled with the defaults as JSON; only the required one is marked.
    expect(await text(page, `${target} label`)).toBe('target required');
    expect(await page.locator(`${target} input[required]`).count()).toBe(1);
    expect(await page.locator('#run-form .req').count()).toBe(1);
    expect(await page.inputValue(`${target} input`)).toBe('');
    expect(await page.inputValue('#run-form [data-param="rows"] input')).toBe('3');
    expect(await page.inputValue('#run-form [data-param="note"] input')).toBe(JSON.stringify(XSS));
    expect(await text(page, '#run-form .hint')).toMatch(/JSON/);

    // Empty, then not JSON: said next to the field, and nothing is sent.
    await page.click('#run-submit');
    await page.waitForSelector(`${target} .field-error:not([hidden])`);
    expect(await text(page, `${target} .field-error`)).toMatch(/^Required/);
    await page.fill(`${target} input`, XSS);
    await page.click('#run-submit');
    await vi.waitFor(async () => expect(await text(page, `${target} .field-error`)).toMatch(/^Not valid JSON/), until);
    expect(await page.locator('#run-form [data-param="rows"] .field-error').isHidden()).toBe(true);
    expect(posts).toBe(0);
    expect(await runsOfFlow()).toEqual([]);

    // What the server still refuses (a label over its length limit) is shown in the form.
    const value = { who: XSS, ids: [1, 2] };
    await page.fill(`${target} input`, JSON.stringify(value));
    await page.fill('#run-labels', `gpu, ${'x'.repeat(1001)}`);
    await page.click('#run-submit');
    await page.waitForSelector('#run-form-error:not([hidden])');
    expect(await text(page, '#run-form-error')).toMatch(/labels/);
    expect(await page.locator(`${target} .field-error`).isHidden()).toBe(true);
    expect(posts).toBe(1);
    expect(await runsOfFlow()).toEqual([]);

    // Fixed: a run with exactly the values given (defaults left to the flow), and its page.
    await page.fill('#run-labels', 'gpu, nightly,');
    await page.click('#run-submit');
    await page.waitForFunction(() => /^#\/runs\/[^/]+$/.test(location.hash));
    const id = decodeURIComponent(new URL(page.url()).hash.slice('#/runs/'.length));
    const made = await s.getFlowRun(id);
    expect(made).toMatchObject({ flowId: flow.id, state: 'Scheduled' });
    expect(made.parameters).toEqual({ target: value });
    expect([...made.labels].sort()).toEqual(['base', 'gpu', 'nightly']);
    expect(await runsOfFlow()).toHaveLength(1);
    await vi.waitFor(async () => expect(await text(page, '#run-facts .state')).toBe('Scheduled'), until);
    expect(JSON.parse(await text(page, '#run-parameters'))).toEqual({ target: value });
    expect(await text(page, '#run-parameters')).toContain(XSS.replaceAll('"', '\\"'));
    expect(await page.locator('img, main script').count()).toBe(0);
    expect(await page.evaluate(() => window.__xss)).toBeUndefined();
    expect(problems).toEqual([]);
    await page.context().close();
  });

  it('shows a flow name and a log line holding markup as text', async () => {
    const s = open.store;
    const v = await registerFixture(s, 'ok.ts', 'deploy-ok', { project: 'xss', name: XSS });
    const run = await s.createFlowRun({ flowId: v.flowId });
    const line = '<script>window.__xss=2</script><img src=y onerror="window.__xss=3">';
    await s.writeLogs([{ flowRunId: run.id, level: 'info', message: line, at: Date.now(), source: 'task' }]);
    const { page, problems } = await newPage();
    await page.goto(`${open.url}/ui/#/runs?project=xss`);
    await vi.waitFor(async () => expect(await rowIds(page)).toEqual([run.id]), until);
    expect(await text(page, `#runs-table tr[data-run="${run.id}"] td.flow a`)).toBe(XSS);
    await page.goto(`${open.url}/ui/#/runs/${run.id}`);
    await vi.waitFor(async () => expect(await text(page, '#run-logs')).toContain(line), until);
    expect(await text(page, '#run h1')).toContain(XSS);
    await page.goto(`${open.url}/ui/#/flows?project=xss`);
    await vi.waitFor(async () => expect(await text(page, `#flows-table tr[data-flow="${v.flowId}"] td.name`)).toBe(XSS), until);
    expect(await page.locator('img, main script').count()).toBe(0);
    expect(await page.evaluate(() => window.__xss)).toBeUndefined();
    expect(problems).toEqual([]);
    await page.context().close();
  });

  it('reconnects when the server comes back, and re-reads what changed while the feed was down', async () => {
    const v = await registerFixture(open.store, 'ok.ts', 'deploy-ok', { project: 'restart' });
    const run = await open.store.createFlowRun({ flowId: v.flowId });
    const { page, problems } = await newPage();
    await page.goto(`${open.url}/ui/#/runs?project=restart`);
    await vi.waitFor(async () => expect(await rowIds(page)).toEqual([run.id]), until);
    await waitLive(page);

    // Stop the server, change the run behind its back, start it again on the same port.
    const port = open.port;
    await open.close();
    await page.waitForFunction(() => /^reconnecting in \d+ s$/.test(document.getElementById('feed')?.textContent ?? ''), null, { timeout: 10_000 });
    const db = await openDb(`sqlite:${join(tmp, 'open.db')}`);
    await new Store(db).setFlowRunState(run.id, 'Failed', { message: 'changed while the feed was down' });
    await db.close();
    open = await startServer({ db: `sqlite:${join(tmp, 'open.db')}`, port, services: false });

    await waitLive(page);
    const row = `#runs-table tr[data-run="${run.id}"]`;
    await vi.waitFor(async () => expect(await text(page, `${row} .state`)).toBe('Failed'), until);
    expect(await text(page, `${row} td.msg`)).toBe('changed while the feed was down');
    await vi.waitFor(async () => expect(await page.locator('#error').isHidden()).toBe(true), until);
    // And it is live again.
    await open.store.setFlowRunState(run.id, 'Scheduled');
    await vi.waitFor(async () => expect(await text(page, `${row} .state`)).toBe('Scheduled'), until);
    expect(problems).toEqual([]);
    await page.context().close();
  });

  it('with a token on the server, asks for it, refuses a wrong one, and works once it is entered', async () => {
    const s = locked.store;
    const v = await registerFixture(s, 'ok.ts', 'deploy-ok', { project: 'locked' });
    const run = await s.createFlowRun({ flowId: v.flowId });
    const { page, problems } = await newPage();
    await page.goto(`${locked.url}/ui/`);
    await page.waitForSelector('#login:not([hidden])');
    expect(await page.locator('#view').isHidden()).toBe(true);

    await page.fill('#token', 'not-the-token');
    await page.click('#login button[type=submit]');
    await page.waitForFunction(() => /refused the token/.test(document.getElementById('login-why')?.textContent ?? ''), null, { timeout: 10_000 });
    expect(await page.locator('#login').isVisible()).toBe(true);

    await page.fill('#token', TOKEN);
    await page.click('#login button[type=submit]');
    await vi.waitFor(async () => expect(await rowIds(page)).toEqual([run.id]), until);
    expect(await page.locator('#login').isHidden()).toBe(true);
    await waitLive(page);
    await s.setFlowRunState(run.id, 'Running');
    await vi.waitFor(async () => expect(await text(page, `#runs-table tr[data-run="${run.id}"] .state`)).toBe('Running'), until);

    // Asked once: a reload keeps the token for this tab.
    await page.reload();
    await vi.waitFor(async () => expect(await rowIds(page)).toEqual([run.id]), until);
    expect(await page.locator('#login').isHidden()).toBe(true);
    expect(problems).toEqual([]);
    await page.context().close();
  });
});
