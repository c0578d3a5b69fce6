/**
 * `--tls-cert`, `--tls-key` and `--tls-ca`, shared by `weft scheduler` and `weft worker`:
 * the PEM files read, with a UsageError naming the flag when one cannot be.
 */
import { readFile } from 'node:fs/promises';
import { UsageError } from './args.ts';

export interface TlsFiles {
  cert?: Buffer;
  key?: Buffer;
  ca?: Buffer;
}

/** The TLS files the flags name; undefined when none is given. `--tls-cert` and `--tls-key` go together. */
export async function readTlsFlags(flags: Readonly<Record<string, unknown>>): Promise<TlsFiles | undefined> {
  const cert = flags['tls-cert'];
  const key = flags['tls-key'];
  const ca = flags['tls-ca'];
  if ((cert === undefined) !== (key === undefined)) throw new UsageError('--tls-cert and --tls-key go together');
  if (typeof cert !== 'string' && typeof ca !== 'string') return undefined;
  const read = async (flag: string, path: string): Promise<Buffer> => {
    try {
      return await readFile(path);
    } catch (err) {
      throw new UsageError(`--${flag}: cannot read ${path}: ${(err as Error).message}`);
    }
  };
  const out: TlsFiles = {};
  if (typeof cert === 'string') out.cert = await read('tls-cert', cert);
  if (typeof key === 'string') out.key = await read('tls-key', key);
  if (typeof ca === 'string') out.ca = await read('tls-ca', ca);
  return out;
}
