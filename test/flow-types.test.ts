/**
 * Type tests: checked by `tsc --noEmit` (CI) — a `@ts-expect-error` that is not an error
 * fails the type check. The runtime part only builds flows.
 */
import { describe, expect, expectTypeOf, it } from 'vitest';
import {
  Flow,
  caseOf,
  flatten,
  flow,
  merge,
  parameter,
  task,
  unmapped,
  type Ref,
  type Task,
} from '../src/flow/index.ts';
import type { FlowRunResult } from '../src/runner/types.ts';

const len = task(function len(s: string): number {
  return s.length;
});
const double = task(async function double(x: number): Promise<number> {
  return x * 2;
});
const upper = task(function upper(s: string): string {
  return s.toUpperCase();
});
const split = task(function split(s: string): string[] {
  return s.split(',');
});
const chunks = task(function chunks(n: number): number[][] {
  return [[n], [n + 1]];
});
const join = task(function join(xs: string[], sep: string): string {
  return xs.join(sep);
});
const opt = task(function opt(a: number, b?: string): string {
  return `${a}${b ?? ''}`;
});

describe('flow types', () => {
  it('task() keeps the signature', () => {
    expectTypeOf(len).toEqualTypeOf<Task<[s: string], number>>();
    expectTypeOf(len.fn).toEqualTypeOf<(s: string) => number>();
    expectTypeOf(double.fn).returns.toEqualTypeOf<Promise<number>>();
  });

  it('a call returns Ref<Awaited<R>> and accepts values or refs', () => {
    flow('types-call', () => {
      const n = len('abc');
      expectTypeOf(n).toEqualTypeOf<Ref<number>>();
      const d = double(n);
      expectTypeOf(d).toEqualTypeOf<Ref<number>>(); // Promise unwrapped
      double(3);
      opt(1);
      opt(n, 'x');
      opt(n, upper('x'));

      // @ts-expect-error a Ref<string> into a number parameter
      double(upper('x'));
      // @ts-expect-error a string constant into a number parameter
      double('3');
      // @ts-expect-error too few arguments
      join(split('a,b'));
      // @ts-expect-error too many arguments
      len('a', 'b');
    });
  });

  it('.map() returns Ref<T[]> and checks element types', () => {
    flow('types-map', () => {
      const parts = split('a,b');
      const lens = len.map(parts);
      expectTypeOf(lens).toEqualTypeOf<Ref<number[]>>();
      const doubled = double.map(lens); // mapped over mapped
      expectTypeOf(doubled).toEqualTypeOf<Ref<number[]>>();
      expectTypeOf(join.map([['a'], ['b']], unmapped('-'))).toEqualTypeOf<Ref<string[]>>();
      join.map(unmapped(parts), ['-', '+']);
      expectTypeOf(double.map(flatten(chunks(1)))).toEqualTypeOf<Ref<number[]>>();
      double.map([1, 2, 3]);

      // @ts-expect-error mapping strings into a number parameter
      double.map(parts);
      // @ts-expect-error a list constant of the wrong element type
      double.map(['1']);
      // @ts-expect-error unmapped value of the wrong type
      join.map([['a']], unmapped(1));
      // @ts-expect-error flatten of lists of strings into a number parameter
      double.map(flatten([['a']]));
    });
  });

  it('with() keeps the signature', () => {
    flow('types-with', () => {
      const a = len.with({ name: 'first', maxRetries: 2, upstream: [] })('x');
      expectTypeOf(a).toEqualTypeOf<Ref<number>>();
      expectTypeOf(len.with({}).map(['a'])).toEqualTypeOf<Ref<number[]>>();
      // @ts-expect-error a number into a string parameter
      len.with({ name: 'bad' })(1);
      expect(() =>
        // @ts-expect-error unknown option
        len.with({ maxRetrys: 1 }),
      ).toThrow('task "len": unknown option "maxRetrys"');
    });
  });

  it('parameters, merge, caseOf, get', () => {
    flow('types-misc', () => {
      const n = parameter('n', 3);
      expectTypeOf(n).toEqualTypeOf<Ref<number>>();
      const s = parameter<string>('s');
      expectTypeOf(s).toEqualTypeOf<Ref<string>>();
      const a = caseOf(n, 3, () => len(s));
      expectTypeOf(a).toEqualTypeOf<Ref<number>>();
      const m = merge(a, upper(s));
      expectTypeOf(m).toEqualTypeOf<Ref<number | string>>();
      const obj = task(function obj(): { x: number; y: string } {
        return { x: 1, y: '' };
      });
      expectTypeOf(obj().get('x')).toEqualTypeOf<Ref<number>>();
      // @ts-expect-error no such key
      obj().get('z');
      // @ts-expect-error a Ref<number> into a string parameter
      len(n);
    });
  });

  it('flow outputs are typed and result() is typed by them', () => {
    const f = flow('types-out', () => {
      const n = len('abc');
      return { n, s: upper('x'), list: len.map(['a', 'b']) };
    });
    expectTypeOf(f).toEqualTypeOf<Flow<{ n: Ref<number>; s: Ref<string>; list: Ref<number[]> }>>();
    const check = (r: FlowRunResult): void => {
      expectTypeOf(r.result(f.outputs.n)).toEqualTypeOf<number>();
      expectTypeOf(r.result(f.outputs.s)).toEqualTypeOf<string>();
      expectTypeOf(r.result(f.outputs.list)).toEqualTypeOf<number[]>();
    };
    void check;
  });

  it('imperative API is typed too', () => {
    const f = new Flow('types-imp');
    const a = f.add(len, ['x']);
    expectTypeOf(a).toEqualTypeOf<Ref<number>>();
    expectTypeOf(f.map(double, [[1, 2]])).toEqualTypeOf<Ref<number[]>>();
    expectTypeOf(f.parameter('p', 'x')).toEqualTypeOf<Ref<string>>();
    // @ts-expect-error a Ref<number> into a string parameter
    f.add(len, [a]);
    // Covariance: a Ref of a subtype fits.
    const lit = task(function lit(): 'a' | 'b' {
      return 'a';
    });
    f.add(len, [f.add(lit, [])]);
  });
});
