import { describe, expect, it } from 'vitest';
import {
  Flow,
  caseOf,
  flatten,
  flow,
  ifElse,
  merge,
  parameter,
  switchOn,
  task,
  triggers,
  unmapped,
} from '../src/flow/index.ts';
import type { GraphSpec, NodeSpec } from '../src/flow/spec.ts';
import { SkipSignal } from '../src/errors.ts';
import { inlineFn, inlineOpOf } from '../src/flow/inline.ts';

const add = task(function add(a: number, b: number): number {
  return a + b;
});
const inc = task(function inc(x: number): number {
  return x + 1;
});
const range = task(function range(n: number): number[] {
  return Array.from({ length: n }, (_, i) => i);
});
const sum = task(function sum(xs: number[]): number {
  return xs.reduce((a, b) => a + b, 0);
});
const pairs = task(function pairs(x: number): number[] {
  return [x, x];
});
const show = task(function show(x: unknown): string {
  return String(x);
});

function node(spec: GraphSpec, key: string): NodeSpec {
  const n = spec.nodes.find((x) => x.key === key);
  if (n === undefined) throw new Error(`no node ${key} in ${spec.nodes.map((x) => x.key).join(', ')}`);
  return n;
}

describe('flow spec: nodes and bindings', () => {
  it('records task uses with const and ref bindings, keys and ids', () => {
    const f = flow('basic', () => {
      const a = add(1, 2);
      const b = inc(a);
      return { a, b };
    });
    const s = f.spec();
    expect(s.name).toBe('basic');
    expect(s.nodes).toHaveLength(2);
    const a = s.nodes[0]!;
    expect(a).toMatchObject({ id: 0, key: 'add', kind: 'task', taskKey: add.key, module: add.module, mapped: false, upstream: [] });
    expect(a.args).toEqual([
      { kind: 'const', value: 1, mode: 'plain' },
      { kind: 'const', value: 2, mode: 'plain' },
    ]);
    expect(s.nodes[1]!.args).toEqual([{ kind: 'ref', node: 0, mode: 'plain' }]);
    expect(f.outputs.a.node).toBe(0);
    expect(f.outputs.b.node).toBe(1);
    expect(f.outputs.b.key).toBe('inc');
    expect(s.modules).toEqual([add.module]);
    expect(add.module).toMatch(/^file:\/\/.*\/test\/flow-spec\.test\.ts$/);
  });

  it('gives further uses of a task keys name-2, name-3', () => {
    const f = flow('keys', () => {
      const x = inc(1);
      const y = inc(x);
      inc(y);
    });
    expect(f.spec().nodes.map((n) => n.key)).toEqual(['inc', 'inc-2', 'inc-3']);
  });

  it('skips implicit keys taken by explicit names', () => {
    const f = flow('keys2', () => {
      inc.with({ name: 'inc-2' })(1);
      inc(1);
      inc(1);
      inc.with({ name: 'x' })(1);
    });
    expect(f.spec().nodes.map((n) => n.key)).toEqual(['inc-2', 'inc', 'inc-3', 'x']);
  });

  it('a task named like another key gets a free key', () => {
    const incDash2 = task({ name: 'inc-2' }, (x: number) => x);
    const f = flow('keys3', () => {
      inc(1);
      inc(1); // inc-2
      incDash2(1); // 'inc-2' is taken → inc-2-2
    });
    expect(f.spec().nodes.map((n) => n.key)).toEqual(['inc', 'inc-2', 'inc-2-2']);
  });

  it('a mapped use: mapped node, mapped/unmapped/flatten modes', () => {
    const f = flow('map', () => {
      const r = range(3);
      const m = add.map(r, unmapped(10));
      const m2 = inc.map(m); // mapped over mapped
      const total = sum(m2); // reduce: plain
      const p = pairs.map(r);
      const flat = inc.map(flatten(p));
      const c = add.map([1, 2, 3], [4, 5, 6]);
      return { m, m2, total, flat, c };
    });
    const s = f.spec();
    expect(node(s, 'add')).toMatchObject({
      mapped: true,
      args: [
        { kind: 'ref', node: 0, mode: 'mapped' },
        { kind: 'const', value: 10, mode: 'unmapped' },
      ],
    });
    expect(node(s, 'inc')).toMatchObject({ mapped: true, args: [{ kind: 'ref', node: f.outputs.m.node, mode: 'mapped' }] });
    expect(node(s, 'sum')).toMatchObject({ mapped: false, args: [{ kind: 'ref', node: f.outputs.m2.node, mode: 'plain' }] });
    expect(node(s, 'inc-2')).toMatchObject({ mapped: true, args: [{ kind: 'ref', node: node(s, 'pairs').id, mode: 'flatten' }] });
    expect(node(s, 'add-2')).toMatchObject({
      mapped: true,
      args: [
        { kind: 'const', value: [1, 2, 3], mode: 'mapped' },
        { kind: 'const', value: [4, 5, 6], mode: 'mapped' },
      ],
    });
  });

  it('unmapped(ref) is an unmapped ref binding; unmapped outside .map() is plain', () => {
    const f = flow('unm', () => {
      const n = inc(1);
      add.map([1, 2], unmapped(n));
      add(unmapped(n) as unknown as number, 1);
    });
    const s = f.spec();
    expect(s.nodes[1]!.args[1]).toEqual({ kind: 'ref', node: 0, mode: 'unmapped' });
    expect(s.nodes[2]!.args[0]).toEqual({ kind: 'ref', node: 0, mode: 'plain' });
  });

  it('ordering-only edges: upstream option, after(), setDependencies', () => {
    const f = flow('order', (fl) => {
      const a = inc(1);
      const b = inc(2);
      const c = inc.with({ upstream: [a] })(3);
      const d = inc(4).after(b, c);
      fl.setDependencies(a, { upstream: [b] });
      return { a, b, c, d };
    });
    const s = f.spec();
    expect(s.nodes[2]!.upstream).toEqual([0]);
    expect(s.nodes[3]!.upstream).toEqual([1, 2]);
    expect(s.nodes[0]!.upstream).toEqual([1]);
    // Terminal nodes only: d (a, b, c all have downstream through ordering edges).
    expect(s.referenceTasks).toEqual([3]);
  });

  it('per-use options override the task options; explicit name is the key', () => {
    const t = task({ name: 'fetch', maxRetries: 1, tags: ['io'] }, (u: string) => u);
    const f = flow('with', () => {
      t('a');
      t.with({ name: 'fetch_b', maxRetries: 5, priority: 3 })('b');
      t.with({ timeout: '2s' })('c');
    });
    const s = f.spec();
    expect(s.nodes[0]!.options).toBe(t.options);
    expect(s.nodes[1]!.key).toBe('fetch_b');
    expect(s.nodes[1]!.options).toMatchObject({ name: 'fetch_b', maxRetries: 5, priority: 3, tags: ['io'] });
    expect(s.nodes[2]!).toMatchObject({ key: 'fetch-2', taskKey: t.key });
    expect(s.nodes[2]!.options).toMatchObject({ name: 'fetch', maxRetries: 1, timeoutMs: 2000 });
  });

  it('the spec is cached, frozen, and a later change makes a new one without touching the old', () => {
    const f = new Flow('cache');
    const a = f.add(inc, [1]);
    const b = f.add(inc, [2]);
    const s1 = f.spec();
    expect(f.spec()).toBe(s1);
    expect(Object.isFrozen(s1)).toBe(true);
    expect(Object.isFrozen(s1.nodes)).toBe(true);
    f.setDependencies(b, { upstream: [a] });
    const s2 = f.spec();
    expect(s2).not.toBe(s1);
    expect(s1.nodes[1]!.upstream).toEqual([]);
    expect(s2.nodes[1]!.upstream).toEqual([0]);
    expect(s1.referenceTasks).toEqual([0, 1]);
    expect(s2.referenceTasks).toEqual([1]);
  });
});

describe('flow spec: parameters', () => {
  it('parameter nodes with defaults, required and type', () => {
    const f = flow('params', () => {
      const n = parameter('n', 3);
      const name = parameter<string>('name');
      const opt = parameter('opt', undefined, { required: false, type: 'object' });
      const flag = parameter('flag', false, { type: 'boolean' });
      return { r: add(n, 1), name, opt, flag };
    });
    const s = f.spec();
    expect(node(s, 'n')).toMatchObject({ kind: 'parameter', taskKey: '', module: '', args: [], parameter: { name: 'n', default: 3, required: false } });
    expect(node(s, 'name').parameter).toEqual({ name: 'name', default: undefined, required: true });
    expect(node(s, 'opt').parameter).toEqual({ name: 'opt', default: undefined, required: false, type: 'object' });
    expect(node(s, 'flag').parameter).toEqual({ name: 'flag', default: false, required: false, type: 'boolean' });
    expect(node(s, 'add').args[0]).toEqual({ kind: 'ref', node: node(s, 'n').id, mode: 'plain' });
    expect(s.modules).toEqual([add.module]);
  });

  it('imperative parameter()', () => {
    const f = new Flow('imp-params');
    const x = f.parameter('x', 1);
    f.add(inc, [x]);
    expect(f.spec().nodes[0]).toMatchObject({ key: 'x', kind: 'parameter', parameter: { name: 'x', default: 1, required: false } });
  });
});

describe('flow spec: imperative API', () => {
  it('add, map, setDependencies with downstream, setReferenceTasks', () => {
    const f = new Flow('imp');
    const r = f.add(range, [4]);
    const m = f.map(add, [r, unmapped(1)]);
    const t = f.add(sum, [m], { name: 'total' });
    const log = f.add(show, ['start']);
    f.setDependencies(log, { downstream: [r] });
    f.setReferenceTasks([t]);
    const s = f.spec();
    expect(s.nodes.map((n) => n.key)).toEqual(['range', 'add', 'total', 'show']);
    expect(s.nodes[1]!).toMatchObject({ mapped: true, args: [{ kind: 'ref', node: 0, mode: 'mapped' }, { kind: 'const', value: 1, mode: 'unmapped' }] });
    expect(s.nodes[0]!.upstream).toEqual([3]);
    expect(s.referenceTasks).toEqual([2]);
    expect(f.size).toBe(4);
    f.setReferenceTasks([t, log]);
    expect(f.spec().referenceTasks).toEqual([2, 3]);
    f.setReferenceTasks(null);
    expect(f.spec().referenceTasks).toEqual([2]);
  });

  it('build() runs builder code against an existing flow', () => {
    const f = new Flow('b');
    const a = f.add(inc, [1]);
    const b = f.build(() => inc(a));
    expect(f.spec().nodes[1]!.args).toEqual([{ kind: 'ref', node: a.node, mode: 'plain' }]);
    expect(b.key).toBe('inc-2');
  });

  it('referenceTasks option: refs or a function of the outputs', () => {
    const f1 = flow('rt1', () => ({ a: inc(1), b: inc(2) }), { referenceTasks: (o) => [o.a] });
    expect(f1.spec().referenceTasks).toEqual([0]);
    const f2 = flow('rt2', () => {
      const a = inc(1);
      inc(a);
      return a;
    });
    expect(f2.spec().referenceTasks).toEqual([1]);
  });

  it('builds a million-node chain quickly', () => {
    const f = new Flow('big');
    const t0 = performance.now();
    let prev = f.add(inc, [0]);
    for (let i = 1; i < 1_000_000; i++) prev = f.add(inc, [prev]);
    const s = f.spec();
    const ms = performance.now() - t0;
    expect(s.nodes).toHaveLength(1_000_000);
    expect(s.nodes[999_999]!.key).toBe('inc-1000000');
    expect(s.referenceTasks).toEqual([999_999]);
    // Well under a second on an idle machine; generous here because CI shares its cores.
    expect(ms).toBeLessThan(5000);
  });
});

describe('flow spec: triggers and options', () => {
  it('trigger helpers and custom triggers land in the options', () => {
    const custom = (up: readonly { state: string }[]): boolean => up.every((u) => u.state !== 'Failed');
    const a = task({ trigger: triggers.anyFailed }, () => 1);
    const b = task({ trigger: triggers.someSuccessful({ atLeast: 1, atMost: 2 }) }, () => 1);
    const c = task({ trigger: custom }, () => 1);
    const d = task({ trigger: 'allFinished' }, () => 1);
    expect(a.options.trigger).toEqual({ kind: 'builtin', name: 'anyFailed' });
    expect(b.options.trigger).toEqual({ kind: 'builtin', name: 'someSuccessful', atLeast: 1, atMost: 2 });
    expect(c.options.trigger).toEqual({ kind: 'custom', fn: custom, name: 'custom' });
    expect(d.options.trigger).toEqual({ kind: 'builtin', name: 'allFinished' });
    expect(triggers.manualOnly).toEqual({ kind: 'builtin', name: 'manualOnly' });
    expect(triggers.someFailed()).toEqual({ kind: 'builtin', name: 'someFailed' });
  });

  it('defaults', () => {
    const t = task(function plain() {
      return 1;
    });
    expect(t.options).toEqual({
      name: 'plain',
      tags: [],
      maxRetries: 0,
      retryDelayMs: 0,
      retryOn: null,
      timeoutMs: 0,
      trigger: { kind: 'builtin', name: 'allSuccessful' },
      skipOnUpstreamSkip: true,
      cacheForMs: 0,
      cacheValidator: 'durationOnly',
      cacheKey: null,
      checkpoint: false,
      result: null,
      stateHandlers: [],
      onFailure: null,
      priority: 0,
      resources: {},
    });
  });

  it('resolves every option', () => {
    class MyError extends Error {}
    const handler = (): void => {};
    const validator = (): boolean => true;
    const t = task(
      {
        name: 'full',
        tags: ['a', 'b', 'a'],
        maxRetries: 3,
        retryDelay: '1.5s',
        retryOn: [MyError, 'TypeError'],
        timeout: 250,
        trigger: triggers.allFinished,
        skipOnUpstreamSkip: false,
        cacheFor: '2m',
        cacheValidator: validator,
        cacheKey: 'k',
        result: { location: '{flow}/{task}.json', serializer: 'msgpack' },
        target: '{task}.done',
        stateHandlers: [handler],
        onFailure: handler,
        priority: -2,
        resources: { GPU: 1 },
      },
      () => 1,
    );
    expect(t.options).toEqual({
      name: 'full',
      tags: ['a', 'b'],
      maxRetries: 3,
      retryDelayMs: 1500,
      retryOn: ['MyError', 'TypeError'],
      timeoutMs: 250,
      trigger: { kind: 'builtin', name: 'allFinished' },
      skipOnUpstreamSkip: false,
      cacheForMs: 120_000,
      cacheValidator: validator,
      cacheKey: 'k',
      checkpoint: true,
      result: { location: '{flow}/{task}.json', serializer: 'msgpack', target: '{task}.done' },
      stateHandlers: [handler],
      onFailure: handler,
      priority: -2,
      resources: { GPU: 1 },
    });
    expect(task({ retryOn: RangeError }, () => 1).options.retryOn).toEqual(['RangeError']);
    expect(task({ target: 'x', checkpoint: false }, () => 1).options).toMatchObject({ checkpoint: false, result: { target: 'x' } });
    expect(task({ timeout: '200ms', retryDelay: '1h', cacheFor: '1d' }, () => 1).options).toMatchObject({
      timeoutMs: 200,
      retryDelayMs: 3_600_000,
      cacheForMs: 86_400_000,
    });
  });
});

describe('flow spec: conditionals', () => {
  const check = task(function check(x: number): boolean {
    return x > 0;
  });
  const kind = task(function kind(x: string): string {
    return x;
  });

  it('caseOf: an inline compare node, edges to the block roots only', () => {
    const f = flow('case', () => {
      const c = check(1);
      const yes = caseOf(c, true, () => {
        const a = inc(1);
        return inc(a); // rooted in the block: no compare edge
      });
      const no = caseOf(c, false, () => inc(100));
      return { c, yes, no, out: merge(yes, no) };
    });
    const s = f.spec();
    const cmpT = node(s, 'case(true)');
    const cmpF = node(s, 'case(false)');
    expect(cmpT).toMatchObject({ kind: 'inline', taskKey: '', module: '', args: [{ kind: 'ref', node: 0, mode: 'plain' }], mapped: false });
    expect(typeof cmpT.inline).toBe('function');
    expect(node(s, 'inc').upstream).toEqual([cmpT.id]);
    expect(node(s, 'inc-2').upstream).toEqual([]);
    expect(node(s, 'inc-3').upstream).toEqual([cmpF.id]);
    // The compare passes a match through and skips otherwise.
    expect(cmpT.inline!(true)).toBe(true);
    expect(() => cmpT.inline!(false)).toThrow(SkipSignal);
    expect(() => cmpF.inline!(true)).toThrow(SkipSignal);
    const m = node(s, 'merge');
    expect(m).toMatchObject({ kind: 'inline', args: [{ kind: 'ref', node: f.outputs.yes.node, mode: 'plain' }, { kind: 'ref', node: f.outputs.no.node, mode: 'plain' }] });
    expect(m.options.trigger).toEqual({ kind: 'builtin', name: 'notAllSkipped' });
    expect(m.options.skipOnUpstreamSkip).toBe(false);
    expect(m.inline!(undefined, 5)).toBe(5);
    expect(m.inline!(null, 5)).toBe(5);
    expect(m.inline!(0, 5)).toBe(0);
    expect(s.referenceTasks).toEqual([m.id]);
  });

  it('nested cases: the inner compare hangs off the outer one', () => {
    const f = flow('nested', () => {
      const c = check(1);
      caseOf(c, true, () => {
        const d = kind('x');
        caseOf(d, 'x', () => inc(1));
      });
    });
    const s = f.spec();
    const outer = node(s, 'case(true)');
    const inner = node(s, 'case("x")');
    expect(node(s, 'kind').upstream).toEqual([outer.id]);
    expect(inner.upstream).toEqual([]); // rooted in the outer block through kind
    expect(node(s, 'inc').upstream).toEqual([inner.id]);
  });

  it('an empty case leaves no node', () => {
    const f = flow('empty-case', () => {
      const c = check(1);
      caseOf(c, true, () => undefined);
      caseOf(c, true, () => inc(1));
    });
    expect(f.spec().nodes.map((n) => n.key)).toEqual(['check', 'case(true)', 'inc']);
  });

  it('ifElse: truthy/falsy compares upstream of each branch', () => {
    const f = flow('ifelse', () => {
      const c = check(1);
      const a = inc(1);
      const b = inc(2);
      ifElse(c, a, b);
      return { a, b };
    });
    const s = f.spec();
    const t = node(s, 'if(true)');
    const e = node(s, 'if(false)');
    expect(node(s, 'inc').upstream).toEqual([t.id]);
    expect(node(s, 'inc-2').upstream).toEqual([e.id]);
    expect(t.inline!(1)).toBe(1);
    expect(() => t.inline!(0)).toThrow(SkipSignal);
    expect(e.inline!('')).toBe('');
    expect(() => e.inline!('x')).toThrow(SkipSignal);
  });

  it('switchOn: one compare per case; object keys compare as strings', () => {
    const f = flow('switch', () => {
      const k = kind('csv');
      const a = show('a');
      const b = show('b');
      switchOn(k, { csv: a, json: b });
      const n = inc(1);
      switchOn(n, new Map<unknown, typeof a>([[2, show('two')]]));
    });
    const s = f.spec();
    const csv = node(s, 'case("csv")');
    const json = node(s, 'case("json")');
    expect(node(s, 'show').upstream).toEqual([csv.id]);
    expect(node(s, 'show-2').upstream).toEqual([json.id]);
    expect(csv.inline!('csv')).toBe('csv');
    expect(() => csv.inline!('json')).toThrow(SkipSignal);
    const two = node(s, 'case(2)');
    expect(two.inline!(2)).toBe(2);
    expect(() => two.inline!('2')).toThrow(SkipSignal);
  });

  it('inline functions carry their descriptor, and rebuild from it', () => {
    const f = flow('ops', () => {
      const c = check(1);
      const a = caseOf(c, true, () => inc(1));
      ifElse(c, inc(2), undefined);
      switchOn(kind('x'), { x: show(1) });
      return merge(a).get('toFixed');
    });
    const ops = f.spec().nodes.filter((n) => n.kind === 'inline').map((n) => inlineOpOf(n.inline));
    expect(ops).toEqual([
      { op: 'equals', value: true, name: 'case(true)' },
      { op: 'truthy', value: true, name: 'if(true)' },
      { op: 'equalsString', value: 'x', name: 'case("x")' },
      { op: 'merge' },
      { op: 'getItem', key: 'toFixed' },
    ]);
    const rebuilt = inlineFn(JSON.parse(JSON.stringify(ops[0])));
    expect(rebuilt(true)).toBe(true);
    expect(() => rebuilt(false)).toThrow(SkipSignal);
    expect(inlineFn({ op: 'merge' })(undefined, null, 3)).toBe(3);
    expect(inlineOpOf(() => 1)).toBeUndefined();
  });

  it('ref.get(key) is an inline getItem node', () => {
    const obj = task(function obj(): { a: number; b: string } {
      return { a: 1, b: 'x' };
    });
    const f = flow('get', () => inc(obj().get('a')));
    const s = f.spec();
    const g = node(s, 'obj[a]');
    expect(g.kind).toBe('inline');
    expect(g.inline!({ a: 7 })).toBe(7);
  });
});
