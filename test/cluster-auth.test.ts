/**
 * Token auth: an HMAC proof over a server nonce verifies only for the same token, nonce,
 * role and name; token files must be non-empty and not world-readable.
 */
import { chmod, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { AuthError, NONCE_BYTES, PROOF_BYTES, newNonce, proveToken, readTokenFile, verifyProof } from '../src/cluster/auth.ts';

describe('proof of token', () => {
  const token = 's3cret-token';

  it('makes fresh 32-byte nonces', () => {
    const a = newNonce();
    const b = newNonce();
    expect(a.byteLength).toBe(NONCE_BYTES);
    expect(a).not.toEqual(b);
  });

  it('verifies a correct proof, which does not contain the token', () => {
    const nonce = newNonce();
    const proof = proveToken(token, nonce, 'worker', 'w-1');
    expect(proof.byteLength).toBe(PROOF_BYTES);
    expect(Buffer.from(proof).includes(Buffer.from(token))).toBe(false);
    expect(verifyProof(token, nonce, 'worker', 'w-1', proof)).toBe(true);
  });

  it('refuses a wrong token, nonce, role or name', () => {
    const nonce = newNonce();
    const proof = proveToken(token, nonce, 'worker', 'w-1');
    expect(verifyProof('other-token', nonce, 'worker', 'w-1', proof)).toBe(false);
    expect(verifyProof(token, newNonce(), 'worker', 'w-1', proof)).toBe(false);
    expect(verifyProof(token, nonce, 'client', 'w-1', proof)).toBe(false);
    expect(verifyProof(token, nonce, 'worker', 'w-2', proof)).toBe(false);
    expect(verifyProof(token, nonce, 'worker', 'w-1', proveToken('other-token', nonce, 'worker', 'w-1'))).toBe(false);
  });

  it('does not confuse role/name boundaries', () => {
    const nonce = newNonce();
    expect(proveToken(token, nonce, 'worker', 'a')).not.toEqual(proveToken(token, nonce, 'workera', ''));
  });

  it('refuses truncated, extended or empty proofs and short nonces without throwing', () => {
    const nonce = newNonce();
    const proof = proveToken(token, nonce, 'worker', 'w-1');
    expect(verifyProof(token, nonce, 'worker', 'w-1', proof.subarray(0, 31))).toBe(false);
    expect(verifyProof(token, nonce, 'worker', 'w-1', new Uint8Array(0))).toBe(false);
    const longer = new Uint8Array(33);
    longer.set(proof);
    expect(verifyProof(token, nonce, 'worker', 'w-1', longer)).toBe(false);
    const short = nonce.subarray(0, 16);
    expect(verifyProof(token, short, 'worker', 'w-1', proveToken(token, short, 'worker', 'w-1'))).toBe(false);
  });
});

describe('readTokenFile', () => {
  let dir = '';
  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'weft-auth-'));
  });
  afterAll(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  async function file(name: string, text: string, mode: number): Promise<string> {
    const p = join(dir, name);
    await writeFile(p, text);
    await chmod(p, mode);
    return p;
  }

  it('reads and trims a private token file', async () => {
    const p = await file('ok', '  tok-123\n', 0o600);
    await expect(readTokenFile(p)).resolves.toBe('tok-123');
  });

  it.skipIf(process.platform === 'win32')('refuses a world-readable file, saying how to fix it', async () => {
    const p = await file('open', 'tok', 0o644);
    await expect(readTokenFile(p)).rejects.toThrow(AuthError);
    await expect(readTokenFile(p)).rejects.toMatchObject({
      code: 'TOKEN_FILE_INSECURE',
      message: expect.stringContaining('chmod 600'),
    });
  });

  it('refuses an empty or blank file', async () => {
    const p = await file('blank', ' \n\t\n', 0o600);
    await expect(readTokenFile(p)).rejects.toMatchObject({ code: 'TOKEN_FILE_EMPTY', message: expect.stringContaining(p) });
  });

  it('reports a missing file clearly', async () => {
    const p = join(dir, 'missing');
    await expect(readTokenFile(p)).rejects.toMatchObject({ code: 'TOKEN_FILE_UNREADABLE', message: expect.stringContaining(p) });
  });
});
