/** The argument parser and `--param` values (pure). */
import { describe, expect, it } from 'vitest';
import { formatFlags, parseArgs, parseParams, parseValue, UsageError, type FlagSpec } from '../src/cli/args.ts';

const SPECS: FlagSpec[] = [
  { name: 'param', short: 'p', kind: 'list', value: 'K=V', help: 'a parameter' },
  { name: 'executor', kind: 'string', choices: ['local', 'pool'], help: 'executor' },
  { name: 'threads', short: 't', kind: 'count', value: 'N', help: 'threads' },
  { name: 'json', kind: 'string', value: 'OUT', help: 'json out' },
  { name: 'quiet', short: 'q', kind: 'boolean', help: 'quiet' },
];

const fails = (argv: string[]): string => {
  try {
    parseArgs(argv, SPECS);
  } catch (err) {
    expect(err).toBeInstanceOf(UsageError);
    return (err as Error).message;
  }
  throw new Error(`expected ${argv.join(' ')} to fail`);
};

describe('parseArgs', () => {
  it('parses long, short, inline and separate values, and positionals in any order', () => {
    const r = parseArgs(['flow.ts', '--param', 'a=1', '-p', 'b=2', '--param=c=3', '-t', '4', '--executor=pool', '-q', '--json', 'o.json'], SPECS);
    expect(r.positionals).toEqual(['flow.ts']);
    expect(r.flags).toEqual({ param: ['a=1', 'b=2', 'c=3'], threads: 4, executor: 'pool', quiet: true, json: 'o.json' });
  });

  it('leaves absent flags out', () => {
    expect(parseArgs(['x.ts'], SPECS).flags).toEqual({});
  });

  it('takes everything after -- as positionals', () => {
    expect(parseArgs(['--', '--quiet', '-t'], SPECS)).toEqual({ flags: {}, positionals: ['--quiet', '-t'] });
  });

  it('accepts "-" as a positional and a negative number as a value', () => {
    expect(parseArgs(['-', '--param', '-5'], SPECS)).toEqual({ flags: { param: ['-5'] }, positionals: ['-'] });
  });

  it('names the bad flag', () => {
    expect(fails(['--nope'])).toBe('unknown flag --nope');
    expect(fails(['--nope=1'])).toBe('unknown flag --nope');
    expect(fails(['-z'])).toBe('unknown flag -z');
    expect(fails(['-qt'])).toBe('unknown flag -qt');
    expect(fails(['--threads'])).toBe('--threads needs a value (N)');
    expect(fails(['-t', '--quiet'])).toBe('-t needs a value (N)');
    expect(fails(['--threads', '1.5'])).toBe("--threads must be a positive integer, got '1.5'");
    expect(fails(['--threads', '0'])).toBe("--threads must be a positive integer, got '0'");
    expect(fails(['--threads', '2', '--threads', '3'])).toBe('--threads given twice');
    expect(fails(['--executor', 'cluster'])).toBe("--executor must be one of local, pool, got 'cluster'");
    expect(fails(['--json='])).toBe('--json needs a non-empty value');
    expect(fails(['--quiet=1'])).toBe('--quiet takes no value');
    expect(fails(['-q', '--quiet'])).toBe('--quiet given twice');
  });
});

describe('parseParams', () => {
  it('parses JSON values when they parse, else keeps the string', () => {
    expect(
      parseParams(['n=5', 'f=1.5', 'neg=-2', 'yes=true', 'no=false', 'nil=null', 'list=[1,"a"]', 'obj={"k":1}', 'name=bob', 'quoted="42"', 'empty=', 'eq=a=b', 'sp= x ']),
    ).toEqual({ n: 5, f: 1.5, neg: -2, yes: true, no: false, nil: null, list: [1, 'a'], obj: { k: 1 }, name: 'bob', quoted: '42', empty: '', eq: 'a=b', sp: ' x ' });
  });

  it('rejects a pair without a name or "=" and a name given twice', () => {
    expect(() => parseParams(['n'])).toThrow("--param expects NAME=VALUE, got 'n'");
    expect(() => parseParams(['=5'])).toThrow("--param expects NAME=VALUE, got '=5'");
    expect(() => parseParams(['n=1', 'n=2'])).toThrow('--param n given twice');
  });

  it('parseValue: strings that look almost like JSON stay strings', () => {
    expect(parseValue('[1,')).toBe('[1,');
    expect(parseValue('True')).toBe('True');
    expect(parseValue('0x10')).toBe('0x10');
    expect(parseValue('2024-01-31')).toBe('2024-01-31');
  });
});

describe('formatFlags', () => {
  it('aligns the help column', () => {
    const text = formatFlags(SPECS);
    const ls = text.split('\n');
    expect(ls).toHaveLength(5);
    expect(ls[0]).toMatch(/^ {2}-p, --param K=V +a parameter$/);
    expect(ls[1]).toMatch(/^ {6}--executor local\|pool +executor$/);
    const cols = ls.map((l, i) => l.lastIndexOf((SPECS[i] as FlagSpec).help));
    expect(new Set(cols).size).toBe(1);
  });
});
