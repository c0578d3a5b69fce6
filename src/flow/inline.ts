/**
 * The built-in inline nodes (`kind: 'inline'`) as data: each inline function is built
 * from an `InlineOp` descriptor and carries it, so that code that must move a spec
 * across a process boundary (the cluster client sending a graph to its scheduler) can
 * send `inlineOpOf(node.inline)` and rebuild the function with `inlineFn(op)` there.
 * Functions cannot be serialized; these five small operations can.
 */
import { SkipSignal } from '../errors.ts';

export type InlineOp =
  /** caseOf / switchOn(Map): pass the condition through when `cond === value`, else skip. */
  | { readonly op: 'equals'; readonly value: unknown; readonly name: string }
  /** switchOn(object): compare `String(cond)` with the case key. */
  | { readonly op: 'equalsString'; readonly value: string; readonly name: string }
  /** ifElse: pass when `Boolean(cond) === value`, else skip. */
  | { readonly op: 'truthy'; readonly value: boolean; readonly name: string }
  /** merge: the first upstream result that is neither undefined nor null (Prefect: "not None"). */
  | { readonly op: 'merge' }
  /** ref.get(key): `value[key]`. */
  | { readonly op: 'getItem'; readonly key: string | number };

const OP = Symbol.for('weft.inlineOp');

type InlineFn = ((...args: unknown[]) => unknown) & { readonly [OP]?: InlineOp };

/** The descriptor an inline function was built from (undefined for any other function). */
export function inlineOpOf(fn: ((...args: unknown[]) => unknown) | undefined): InlineOp | undefined {
  return fn === undefined ? undefined : (fn as InlineFn)[OP];
}

/** Build the function of an inline node from its descriptor. */
export function inlineFn(op: InlineOp): (...args: unknown[]) => unknown {
  let fn: (...args: unknown[]) => unknown;
  switch (op.op) {
    case 'equals': {
      const { value, name } = op;
      fn = (cond: unknown): unknown => {
        if (cond !== value) throw new SkipSignal(`${name}: condition is ${label(cond)}`);
        return cond;
      };
      break;
    }
    case 'equalsString': {
      const { value, name } = op;
      fn = (cond: unknown): unknown => {
        if (String(cond) !== value) throw new SkipSignal(`${name}: condition is ${label(cond)}`);
        return cond;
      };
      break;
    }
    case 'truthy': {
      const { value, name } = op;
      fn = (cond: unknown): unknown => {
        if (Boolean(cond) !== value) throw new SkipSignal(`${name}: condition is ${label(cond)}`);
        return cond;
      };
      break;
    }
    case 'merge':
      fn = (...values: unknown[]): unknown => mergeFirst(values);
      break;
    case 'getItem': {
      const { key } = op;
      fn = (v: unknown): unknown => (v as Record<string | number, unknown>)[key];
      break;
    }
  }
  const frozen = Object.freeze({ ...op });
  return Object.defineProperty(fn, OP, { value: frozen });
}

/** Prefect's `merge`: the first result that is not None — here neither undefined nor null (a skipped task's result). */
function mergeFirst(values: readonly unknown[]): unknown {
  for (const v of values) if (v !== undefined && v !== null) return v;
  return null;
}

/** A short readable rendering of a value for node names and skip messages. */
export function label(v: unknown): string {
  if (typeof v === 'string') return JSON.stringify(v);
  if (typeof v === 'bigint') return `${v}n`;
  if (typeof v === 'object' && v !== null) {
    try {
      return JSON.stringify(v);
    } catch {
      return Object.prototype.toString.call(v);
    }
  }
  return String(v);
}
