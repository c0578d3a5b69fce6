/**
 * Property tests of the scheduler core (STYLE #5): random DAGs (edges only from lower to
 * higher ids, a few mapped nodes), random scripted outcomes per task (errors, timeouts,
 * skips, loops, retry signals, lost workers, pauses), driven in random orders (random
 * batches of ready tasks completed in shuffled, interleaved order; stale outcomes thrown
 * in). Validate mode is on throughout.
 *
 * Checked: each dispatch has a fresh run id and happens only after all of its upstream
 * tasks finished; stale outcomes are rejected and change nothing; tag limits hold; the
 * run ends with one final `done`; and every task's final state, dispatch count and
 * attempt count agree with a simple reference model (a recursive evaluation over the
 * DAG, written here from the documented semantics, independent of the core).
 */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import type { TriggerName } from '../src/flow/spec.ts';
import { SchedulerCore, type FailureKind, type Instruction } from '../src/scheduler/core.ts';
import { isFinished, MAPPED, MAPPING, STATE_LABELS } from '../src/scheduler/states.ts';
import { SpecBuilder, mapped, type NodeOpts } from './helpers/spec-builder.ts';
import { mulberry32 } from '../bench/stats.ts';

// ---------------------------------------------------------------------------
// Random graphs and scripts

type Ev = 'ok' | 'cache' | 'skip' | 'error' | 'timeout' | 'loop' | 'retry' | 'lost' | 'pause';

const POISON = 3;
const MAX_WIDTH = 4;
const TRIGGERS: readonly TriggerName[] = ['allSuccessful', 'allSuccessful', 'allSuccessful', 'allFinished', 'anyFailed'];

interface GNode {
  readonly deps: number[]; // plain deps (for a mapped node: wired to each child)
  readonly source: number; // mapped nodes: the node mapped over, else -1
  readonly width: number; // mapped over a plain node: the list length inputLength reports
  readonly trigger: TriggerName;
  readonly skipOnUpstreamSkip: boolean;
  readonly maxRetries: number;
  readonly tagged: boolean;
  readonly script: Ev[];
  readonly childScripts: Ev[][]; // mapped nodes: one script per child
}

interface Params {
  readonly seed: number;
  readonly n: number;
  readonly pMapped: number;
  readonly pBad: number; // weight of non-ok events
  readonly pause: boolean; // scripts may pause
  readonly resumePaused: boolean; // the driver resumes paused tasks (else they stay paused)
  readonly tagLimit: number; // 0: no tag limits
}

function genGraph(p: Params, rnd: () => number): GNode[] {
  const int = (k: number): number => Math.floor(rnd() * k);
  const bad: [Ev, number][] = [
    ['error', 15],
    ['timeout', 4],
    ['skip', 6],
    ['loop', 5],
    ['retry', 3],
    ['lost', 6],
    ['pause', p.pause ? 3 : 0],
  ];
  const badTotal = bad.reduce((s, [, w]) => s + w, 0);
  const event = (): Ev => {
    if (rnd() >= p.pBad) return rnd() < 0.2 ? 'cache' : 'ok';
    let x = rnd() * badTotal;
    for (const [e, w] of bad) if ((x -= w) < 0) return e;
    return 'error';
  };
  const script = (): Ev[] => Array.from({ length: int(5) }, event);
  const nodes: GNode[] = [];
  for (let i = 0; i < p.n; i++) {
    const deps = new Set<number>();
    const k = i === 0 ? 0 : int(4);
    const window = Math.min(i, 1 + int(40));
    for (let j = 0; j < k; j++) deps.add(i - 1 - int(window));
    let source = -1;
    if (i > 0 && rnd() < p.pMapped) {
      source = i - 1 - int(window);
      deps.delete(source);
    }
    nodes.push({
      deps: [...deps],
      source,
      width: int(MAX_WIDTH + 1),
      trigger: TRIGGERS[int(TRIGGERS.length)]!,
      skipOnUpstreamSkip: rnd() < 0.8,
      maxRetries: int(3),
      tagged: p.tagLimit > 0 && rnd() < 0.2,
      script: script(),
      childScripts: source >= 0 ? Array.from({ length: MAX_WIDTH }, script) : [],
    });
  }
  return nodes;
}

function buildSpec(nodes: readonly GNode[]) {
  const g = new SpecBuilder();
  const optCache = new Map<string, NodeOpts>(); // share option objects (the builder shares by identity)
  nodes.forEach((nd, i) => {
    const key = `${nd.trigger}/${nd.skipOnUpstreamSkip}/${nd.maxRetries}/${nd.tagged}`;
    let opts = optCache.get(key);
    if (opts === undefined) {
      opts = {
        trigger: { kind: 'builtin', name: nd.trigger },
        skipOnUpstreamSkip: nd.skipOnUpstreamSkip,
        maxRetries: nd.maxRetries,
        retryDelayMs: 10,
        tags: nd.tagged ? ['lim'] : [],
      };
      optCache.set(key, opts);
    }
    if (nd.source >= 0) g.map(`n${i}`, [mapped(nd.source), ...nd.deps], opts);
    else g.task(`n${i}`, nd.deps, opts);
  });
  return g.build();
}

// ---------------------------------------------------------------------------
// The reference model

type Label = 'pending' | 'paused' | 'mapping' | 'mapped' | 'success' | 'cached' | 'skipped' | 'failed' | 'timed-out' | 'trigger-failed';

interface Expected {
  label: Label;
  dispatches: number;
  attempts: number;
  children?: Expected[];
}

const FINAL = new Set<Label>(['mapped', 'success', 'cached', 'skipped', 'failed', 'timed-out', 'trigger-failed']);
type Cls = 'S' | 'K' | 'F';
const cls = (l: Label): Cls => (l === 'skipped' ? 'K' : l === 'success' || l === 'cached' || l === 'mapped' ? 'S' : 'F');

/** A task whose trigger passed: play its script (missing events are plain successes). */
function play(script: readonly Ev[], maxRetries: number, resumePaused: boolean): Expected {
  let attempts = 0;
  let dispatches = 0;
  let lost = 0;
  let notAnAttempt = false;
  for (let k = 0; ; k++) {
    const ev = script[k] ?? 'ok';
    dispatches++;
    if (notAnAttempt) notAnAttempt = false;
    else attempts++;
    const done = (label: Label): Expected => ({ label, dispatches, attempts });
    switch (ev) {
      case 'ok':
        return done('success');
      case 'cache':
        return done('cached');
      case 'skip':
        return done('skipped');
      case 'error':
      case 'timeout':
        if (attempts <= maxRetries) continue;
        return done(ev === 'error' ? 'failed' : 'timed-out');
      case 'loop':
        notAnAttempt = true;
        continue;
      case 'retry':
        continue;
      case 'lost':
        if (++lost >= POISON) return done('failed');
        notAnAttempt = true;
        continue;
      case 'pause':
        if (!resumePaused) return done('paused');
        continue;
    }
  }
}

/** What an upstream contributes to a consumer's trigger counts; null while it is not finished. */
function contribution(e: Expected): Cls[] | null {
  if (!FINAL.has(e.label)) return null;
  if (e.label === 'mapped' && e.children !== undefined) return e.children.map((c) => cls(c.label));
  return [cls(e.label)];
}

function gated(ups: readonly (Cls[] | null)[], nd: GNode, script: readonly Ev[], resumePaused: boolean): Expected {
  const none: Expected = { label: 'pending', dispatches: 0, attempts: 0 };
  if (ups.some((u) => u === null)) return none;
  const all = (ups as Cls[][]).flat();
  const skipped = all.filter((c) => c === 'K').length;
  const failed = all.filter((c) => c === 'F').length;
  const end = (label: Label): Expected => ({ label, dispatches: 0, attempts: 0 });
  if (skipped > 0 && nd.skipOnUpstreamSkip) return end('skipped');
  const pass = nd.trigger === 'allSuccessful' ? failed === 0 : nd.trigger === 'allFinished' ? true : all.length === 0 || failed > 0;
  if (!pass) return end('trigger-failed');
  return play(script, nd.maxRetries, resumePaused);
}

function model(nodes: readonly GNode[], resumePaused: boolean): Expected[] {
  const exp: Expected[] = [];
  const end = (label: Label): Expected => ({ label, dispatches: 0, attempts: 0 });
  nodes.forEach((nd, i) => {
    const plain = nd.deps.map((d) => contribution(exp[d]!));
    if (nd.source < 0) {
      exp.push(gated(plain, nd, nd.script, resumePaused));
      return;
    }
    const src = exp[nd.source]!;
    const srcNode = nodes[nd.source]!;
    let partners: Expected[] | null = null;
    let width = 0;
    if (srcNode.source >= 0 && src.children !== undefined) {
      partners = src.children;
      width = partners.length;
    } else if (!FINAL.has(src.label)) {
      exp.push(end('pending'));
      return;
    } else if (src.label === 'skipped') {
      exp.push(end(nd.skipOnUpstreamSkip ? 'skipped' : 'trigger-failed'));
      return;
    } else if (cls(src.label) === 'F' || srcNode.source >= 0) {
      exp.push(end('trigger-failed')); // failed, or a mapped upstream that did not map
      return;
    } else width = nd.width;
    const children: Expected[] = [];
    for (let c = 0; c < width; c++) {
      const first = partners !== null ? contribution(partners[c]!) : [cls(src.label)];
      children.push(gated([first, ...plain], nd, nd.childScripts[c]!, resumePaused));
    }
    exp.push({ label: children.every((c) => FINAL.has(c.label)) ? 'mapped' : 'mapping', dispatches: 0, attempts: 0, children });
    void i;
  });
  return exp;
}

function modelRunState(nodes: readonly GNode[], exp: readonly Expected[]): string {
  const hasDown = new Uint8Array(nodes.length);
  for (const nd of nodes) {
    for (const d of nd.deps) hasDown[d] = 1;
    if (nd.source >= 0) hasDown[nd.source] = 1;
  }
  let failed = 0;
  let open = 0;
  let paused = 0;
  const visit = (e: Expected): void => {
    if (e.label === 'mapped' && e.children !== undefined) return e.children.forEach(visit);
    if (!FINAL.has(e.label)) open++;
    else if (cls(e.label) === 'F') failed++;
  };
  const countPaused = (e: Expected): void => {
    if (e.label === 'paused') paused++;
    e.children?.forEach(countPaused);
  };
  exp.forEach(countPaused);
  exp.forEach((e, i) => hasDown[i] === 0 && visit(e));
  if (failed > 0) return 'Failed';
  return open > 0 || paused > 0 ? 'Paused' : 'Success';
}

// ---------------------------------------------------------------------------
// The driver

interface Outcome {
  readonly dones: Extract<Instruction, { op: 'done' }>[];
  readonly dispatches: Map<number, number>;
  readonly stale: number;
}

function drive(core: SchedulerCore, nodes: readonly GNode[], p: Params, rnd: () => number): Outcome {
  const int = (k: number): number => Math.floor(rnd() * k);
  const out = new Int32Array(64);
  const inflight: number[] = [];
  const retries: number[] = [];
  const paused: number[] = [];
  const cursor = new Map<number, number>(); // id -> next script event
  const dispatches = new Map<number, number>();
  const past: [number, number][] = []; // (id, run id) of finished dispatches
  const dones: Extract<Instruction, { op: 'done' }>[] = [];
  let lastRun = 0;
  let stale = 0;
  let tagRunning = 0;

  const scriptOf = (id: number): readonly Ev[] => {
    const nd = nodes[core.node[id]!]!;
    return core.parent[id]! >= 0 ? nd.childScripts[core.mapIndex[id]!]! : nd.script;
  };
  const finishedCode = (u: number): boolean => isFinished(core.state[u]!);
  const upstreamOf = (id: number): number[] => {
    const nd = nodes[core.node[id]!]!;
    const p = core.parent[id]!;
    if (p < 0) return nd.deps;
    const src = nd.source;
    const first = nodes[src]!.source >= 0 ? core.mapRange(src)!.start + core.mapIndex[id]! : src;
    return [first, ...nd.deps];
  };
  const drainIns = (): void => {
    const ins = core.instructions;
    core.instructions = [];
    for (const i of ins) {
      if (i.op === 'retry') retries.push(i.id);
      else if (i.op === 'done') dones.push(i);
      else throw new Error(`unexpected instruction ${JSON.stringify(i)}`);
    }
  };
  const tagged = (id: number): boolean => nodes[core.node[id]!]!.tagged;

  core.start();
  for (let step = 0; ; step++) {
    drainIns();
    if (step > 1_000_000) throw new Error('driver did not finish');
    const canResume = p.resumePaused && paused.length > 0;
    if (core.readyCount === 0 && inflight.length === 0 && retries.length === 0 && !canResume) break;
    const r = rnd();
    if (r < 0.3 && core.readyCount > 0) {
      const k = core.takeReady(rnd() < 0.1 ? 64 : 1 + int(8), out);
      for (let j = 0; j < k; j++) {
        const id = out[j]!;
        const run = core.runId[id]!;
        // A fresh run id per dispatch (so: once per run id), after every upstream finished.
        if (run <= lastRun) throw new Error(`run id ${run} of task ${id} is not fresh (last ${lastRun})`);
        lastRun = run;
        for (const u of upstreamOf(id)) {
          if (!finishedCode(u)) throw new Error(`task ${core.describe(id)} dispatched before upstream ${core.describe(u)} finished`);
        }
        if (core.stateName(id) !== 'Running') throw new Error('dispatched but not running');
        dispatches.set(id, (dispatches.get(id) ?? 0) + 1);
        inflight.push(id);
        if (tagged(id) && ++tagRunning > p.tagLimit) throw new Error(`tag limit ${p.tagLimit} exceeded`);
      }
    } else if (r < 0.85 && inflight.length > 0) {
      // Complete a random in-flight task (shuffled, interleaved with dispatches).
      const j = int(inflight.length);
      const id = inflight[j]!;
      inflight[j] = inflight[inflight.length - 1]!;
      inflight.pop();
      if (tagged(id)) tagRunning--;
      const run = core.runId[id]!;
      const k = cursor.get(id) ?? 0;
      cursor.set(id, k + 1);
      const ev = scriptOf(id)[k] ?? 'ok';
      let accepted: boolean;
      if (ev === 'ok') accepted = core.success(id, run);
      else if (ev === 'cache') accepted = core.cached(id, run);
      else {
        const kind: FailureKind = ev;
        accepted = core.failure(id, run, kind, true, ev === 'retry' ? int(100) : -1, ev === 'lost' ? 'worker died' : undefined);
        if (ev === 'pause') paused.push(id);
      }
      if (!accepted) throw new Error(`current outcome of ${core.describe(id)} rejected`);
      past.push([id, run]);
    } else if (r < 0.93 && retries.length > 0) {
      const j = int(retries.length);
      const id = retries[j]!;
      retries[j] = retries[retries.length - 1]!;
      retries.pop();
      core.retryDue(id);
    } else if (r < 0.97 && canResume) {
      const id = paused.splice(int(paused.length), 1)[0]!;
      if (!core.resume(id)) throw new Error(`resume of paused ${core.describe(id)} refused`);
    } else if (past.length > 0) {
      // A stale outcome: an old run id (or a duplicate of a finished one) changes nothing.
      const [id, run] = past[int(past.length)]!;
      const before = core.state[id];
      const counts = Array.from(core.counts);
      const kinds = ['success', 'cached', 'error', 'lost', 'skip'] as const;
      const kind = kinds[int(kinds.length)]!;
      const res = kind === 'success' ? core.success(id, run) : kind === 'cached' ? core.cached(id, run) : core.failure(id, run, kind);
      if (res) throw new Error(`stale outcome of ${core.describe(id)} (run ${run}) accepted`);
      if (core.state[id] !== before || core.instructions.length > 0) throw new Error('stale outcome changed the state');
      expect(Array.from(core.counts)).toEqual(counts);
      stale++;
    }
  }
  return { dones, dispatches, stale };
}

// ---------------------------------------------------------------------------

function check(p: Params): void {
  const rnd = mulberry32(p.seed);
  const nodes = genGraph(p, rnd);
  const spec = buildSpec(nodes);
  const core = new SchedulerCore(spec, {
    validate: true,
    poisonLimit: POISON,
    tagLimits: p.tagLimit > 0 ? { lim: p.tagLimit } : {},
    inputLength: (id, arg) => {
      if (arg !== 0) throw new Error(`inputLength asked for argument ${arg}`);
      return nodes[id]!.width;
    },
  });
  const { dones, dispatches } = drive(core, nodes, p, rnd);
  const exp = model(nodes, p.resumePaused);

  const compare = (id: number, e: Expected, nd: GNode): void => {
    const label = STATE_LABELS[core.state[id]!];
    if (label !== e.label) {
      throw new Error(`${core.describe(id)}: expected ${e.label}, got ${label}\nstory:\n  ${core.story(id).join('\n  ')}`);
    }
    expect([id, dispatches.get(id) ?? 0, core.attempts[id]]).toEqual([id, e.dispatches, e.attempts]);
    // Plain errors never run a task more than maxRetries + 1 times.
    if (!nd.script.some((ev) => ev === 'retry' || ev === 'pause')) expect(core.attempts[id]!).toBeLessThanOrEqual(nd.maxRetries + 1);
  };
  let size = nodes.length;
  nodes.forEach((nd, i) => {
    const e = exp[i]!;
    compare(i, e, nd);
    if (e.children !== undefined) {
      const range = core.mapRange(i);
      expect(range?.width).toBe(e.children.length);
      expect(core.state[i]).toBe(e.label === 'mapped' ? MAPPED : MAPPING);
      e.children.forEach((c, k) => compare(range!.start + k, c, { ...nd, script: nd.childScripts[k]! }));
      size += e.children.length;
    } else expect(core.mapRange(i)).toBeUndefined();
  });
  expect(core.size).toBe(size);
  // Every task final, or blocked behind a paused one; the run reported done, last with its final state.
  expect(core.isDone).toBe(true);
  expect(dones.length).toBeGreaterThan(0);
  const last = dones[dones.length - 1]!;
  expect(last.state).toBe(core.runState().state);
  expect(last.state).toBe(modelRunState(nodes, exp));
  if (!p.resumePaused || !p.pause) expect(dones.length).toBe(1);
}

const params = (maxN: number): fc.Arbitrary<Params> =>
  fc.record({
    seed: fc.integer({ min: 0, max: 0x7fffffff }),
    n: fc.integer({ min: 1, max: maxN }),
    pMapped: fc.constantFrom(0, 0, 0.05, 0.15),
    pBad: fc.constantFrom(0, 0.1, 0.3, 0.6),
    pause: fc.boolean(),
    resumePaused: fc.boolean(),
    tagLimit: fc.constantFrom(0, 0, 1, 3),
  });

describe('scheduler core: random DAGs against a reference model', () => {
  it('small graphs, many orders', () => {
    fc.assert(fc.property(params(60), check), { numRuns: 200, seed: 1234 });
  });

  it('medium graphs', () => {
    fc.assert(fc.property(params(400), check), { numRuns: 60, seed: 99 });
  });

  it('large graphs (up to 2,000 nodes)', () => {
    fc.assert(
      fc.property(params(2000).map((p) => ({ ...p, n: Math.max(p.n, 1000) })), check),
      { numRuns: 6, seed: 7 },
    );
  });

  it('one run of 5,000 nodes with mapped nodes', () => {
    check({ seed: 42, n: 5000, pMapped: 0.05, pBad: 0.3, pause: true, resumePaused: true, tagLimit: 3 });
  });

  it('random seeds (not fixed): a few more runs', () => {
    fc.assert(fc.property(params(120), check), { numRuns: 40 });
  });
});

describe('scheduler core: cancel at a random point', () => {
  it('nothing starts after cancel; every task ends final; done Cancelled once', () => {
    fc.assert(
      fc.property(fc.integer({ min: 0, max: 0x7fffffff }), fc.integer({ min: 1, max: 150 }), fc.integer({ min: 0, max: 300 }), (seed, n, at) => {
        const rnd = mulberry32(seed);
        const p: Params = { seed, n, pMapped: 0.1, pBad: 0.3, pause: true, resumePaused: false, tagLimit: 0 };
        const nodes = genGraph(p, rnd);
        const core = new SchedulerCore(buildSpec(nodes), { validate: true, inputLength: (id) => nodes[id]!.width });
        core.start();
        const out = new Int32Array(8);
        const running = new Set<number>();
        const dones: Instruction[] = [];
        const take = (): void => {
          for (const i of core.instructions) if (i.op === 'done') dones.push(i);
          core.instructions = [];
        };
        for (let s = 0; s < at && !core.isDone; s++) {
          take();
          if (rnd() < 0.4) {
            const k = core.takeReady(1 + Math.floor(rnd() * 8), out);
            for (let j = 0; j < k; j++) running.add(out[j]!);
          } else if (running.size > 0) {
            const id = [...running][Math.floor(rnd() * running.size)]!;
            running.delete(id);
            const evs: FailureKind[] = ['error', 'skip', 'loop', 'lost', 'pause', 'retry'];
            if (rnd() < 0.6) core.success(id, core.runId[id]!);
            else core.failure(id, core.runId[id]!, evs[Math.floor(rnd() * evs.length)]!);
            if (core.stateName(id) === 'Scheduled') running.delete(id);
          } else if (core.readyCount === 0) {
            for (let id = 0; id < core.size; id++) core.retryDue(id);
          }
        }
        take();
        if (core.isDone) return; // finished (or paused) before the cancel point
        core.cancel();
        const stop = core.instructions.find((i) => i.op === 'stop');
        const stopIds = stop?.op === 'stop' ? [...stop.ids].sort((a, b) => a - b) : [];
        expect(stopIds).toEqual([...running].sort((a, b) => a - b));
        take();
        expect(core.takeReady(8, out)).toBe(0);
        for (const id of running) {
          if (rnd() < 0.5) core.failure(id, core.runId[id]!, 'cancelled');
          else core.success(id, core.runId[id]!);
          take();
        }
        for (let id = 0; id < core.size; id++) expect(isFinished(core.state[id]!)).toBe(true);
        expect(dones).toEqual([{ op: 'done', state: 'Cancelled', message: 'The run was cancelled.' }]);
      }),
      { numRuns: 150, seed: 5 },
    );
  });
});
