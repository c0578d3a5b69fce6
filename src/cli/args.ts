/**
 * A small, strict command-line parser (own code: the CLI's needs are few and the errors
 * must name the bad flag exactly).
 *
 * Accepted forms: `--flag`, `--flag value`, `--flag=value`, `-f`, `-f value`, and `--`
 * to end flags. A flag the command does not declare, a missing value, a value of the
 * wrong shape, a boolean given a value, or a non-list flag given twice is a `UsageError`
 * naming that flag. Pure: no I/O, no process access.
 */

export class UsageError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'UsageError';
  }
}

export type FlagKind =
  /** Present or absent; takes no value. */
  | 'boolean'
  | 'string'
  /** An integer >= 1. */
  | 'count'
  /** Repeatable string flag; values kept in order. */
  | 'list';

export interface FlagSpec {
  /** Long name without dashes, e.g. `threads`. */
  readonly name: string;
  /** One letter, without the dash. */
  readonly short?: string;
  readonly kind: FlagKind;
  /** For 'string': the only values allowed. */
  readonly choices?: readonly string[];
  /** Placeholder for help text, e.g. `N`. */
  readonly value?: string;
  readonly help: string;
}

export type FlagValue = boolean | string | number | string[];

export interface ParsedArgs {
  /** Flags that were given, by long name (booleans true, lists as arrays, counts as numbers). */
  readonly flags: Readonly<Record<string, FlagValue>>;
  readonly positionals: readonly string[];
}

/**
 * Parse `argv` (arguments after the command name) against `specs`.
 * Throws `UsageError` naming the offending flag.
 */
export function parseArgs(argv: readonly string[], specs: readonly FlagSpec[]): ParsedArgs {
  const byLong = new Map<string, FlagSpec>();
  const byShort = new Map<string, FlagSpec>();
  for (const s of specs) {
    byLong.set(s.name, s);
    if (s.short !== undefined) byShort.set(s.short, s);
  }
  const flags: Record<string, FlagValue> = {};
  const positionals: string[] = [];

  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i] as string;
    if (arg === '--') {
      positionals.push(...argv.slice(i + 1));
      break;
    }
    if (arg === '-' || !arg.startsWith('-')) {
      positionals.push(arg);
      continue;
    }

    let spec: FlagSpec | undefined;
    let shown: string;
    let inline: string | undefined;
    if (arg.startsWith('--')) {
      const eq = arg.indexOf('=');
      const name = eq === -1 ? arg.slice(2) : arg.slice(2, eq);
      if (eq !== -1) inline = arg.slice(eq + 1);
      shown = `--${name}`;
      spec = byLong.get(name);
    } else {
      // Short flags are single letters; clusters like `-qv` are not supported (kept strict).
      shown = arg;
      spec = arg.length === 2 ? byShort.get(arg.slice(1)) : undefined;
    }
    if (spec === undefined) throw new UsageError(`unknown flag ${shown}`);

    if (spec.kind === 'boolean') {
      if (inline !== undefined) throw new UsageError(`${shown} takes no value`);
      if (flags[spec.name] !== undefined) throw new UsageError(`${shown} given twice`);
      flags[spec.name] = true;
      continue;
    }

    let raw: string;
    if (inline !== undefined) {
      raw = inline;
    } else {
      const next = argv[i + 1];
      // A following flag is not a value: `--json --quiet` is a missing value, not a file named "--quiet".
      if (next === undefined || (next.startsWith('-') && next !== '-' && !/^-\d/.test(next))) {
        throw new UsageError(`${shown} needs a value${spec.value !== undefined ? ` (${spec.value})` : ''}`);
      }
      raw = next;
      i++;
    }

    switch (spec.kind) {
      case 'list': {
        const prev = flags[spec.name];
        if (Array.isArray(prev)) prev.push(raw);
        else flags[spec.name] = [raw];
        break;
      }
      case 'count': {
        if (flags[spec.name] !== undefined) throw new UsageError(`${shown} given twice`);
        if (!/^\d+$/.test(raw) || Number(raw) < 1 || !Number.isSafeInteger(Number(raw))) {
          throw new UsageError(`${shown} must be a positive integer, got '${raw}'`);
        }
        flags[spec.name] = Number(raw);
        break;
      }
      case 'string': {
        if (flags[spec.name] !== undefined) throw new UsageError(`${shown} given twice`);
        if (raw === '') throw new UsageError(`${shown} needs a non-empty value`);
        if (spec.choices !== undefined && !spec.choices.includes(raw)) {
          throw new UsageError(`${shown} must be one of ${spec.choices.join(', ')}, got '${raw}'`);
        }
        flags[spec.name] = raw;
        break;
      }
    }
  }
  return { flags, positionals };
}

/**
 * Parse `--param k=v` values. A value that parses as JSON (numbers, booleans, null,
 * arrays, objects, quoted strings) is taken as that; anything else is the raw string.
 * So `n=5` is the number 5, `name=bob` is "bob", `id='"42"'` is the string "42".
 */
export function parseParams(pairs: readonly string[]): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const pair of pairs) {
    const eq = pair.indexOf('=');
    if (eq <= 0) throw new UsageError(`--param expects NAME=VALUE, got '${pair}'`);
    const name = pair.slice(0, eq);
    if (Object.prototype.hasOwnProperty.call(out, name)) throw new UsageError(`--param ${name} given twice`);
    out[name] = parseValue(pair.slice(eq + 1));
  }
  return out;
}

export function parseValue(raw: string): unknown {
  try {
    return JSON.parse(raw) as unknown;
  } catch {
    return raw;
  }
}

/** Help lines for a list of flags, aligned. */
export function formatFlags(specs: readonly FlagSpec[]): string {
  const left = specs.map((s) => {
    const short = s.short !== undefined ? `-${s.short}, ` : '    ';
    const value = s.kind === 'boolean' ? '' : ` ${s.value ?? (s.choices !== undefined ? s.choices.join('|') : 'VALUE')}`;
    return `  ${short}--${s.name}${value}`;
  });
  const width = Math.max(...left.map((l) => l.length)) + 2;
  return specs.map((s, i) => `${(left[i] as string).padEnd(width)}${s.help}`).join('\n');
}
