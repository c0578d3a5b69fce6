/**
 * Token auth that never sends the token: the accepting side sends a random nonce
 * (`challenge`), the connecting side answers HMAC-SHA256(token, nonce ‖ role ‖ name)
 * (`proof`), the accepting side recomputes it and compares in constant time.
 *
 * Binding role and name into the MAC stops a proof captured from one peer being
 * replayed under another identity; the fresh nonce stops replay altogether. Role and
 * name are length-prefixed (u32 big-endian) so that ("worker", "a") and ("workera", "")
 * cannot produce the same input.
 */
import { createHmac, randomBytes, timingSafeEqual } from 'node:crypto';
import { stat, readFile } from 'node:fs/promises';
import { registerErrorClass, WeftError } from '../errors.ts';

export const NONCE_BYTES = 32;
/** HMAC-SHA256 output. */
export const PROOF_BYTES = 32;

/** Auth set-up errors (token file). A failed proof is not thrown: `verifyProof` returns false. */
export class AuthError extends WeftError {
  constructor(code: 'TOKEN_FILE_EMPTY' | 'TOKEN_FILE_INSECURE' | 'TOKEN_FILE_UNREADABLE', message: string, options?: { cause?: unknown }) {
    super(code, message, options);
    this.name = 'AuthError';
  }
}
registerErrorClass('AuthError', AuthError);

/** 32 random bytes for one handshake. Never reuse one. */
export function newNonce(): Uint8Array {
  return new Uint8Array(randomBytes(NONCE_BYTES));
}

function macInput(nonce: Uint8Array, role: string, name: string): Buffer {
  const r = Buffer.from(role, 'utf8');
  const n = Buffer.from(name, 'utf8');
  const out = Buffer.allocUnsafe(nonce.byteLength + 4 + r.length + 4 + n.length);
  let at = 0;
  out.set(nonce, at);
  at += nonce.byteLength;
  at = out.writeUInt32BE(r.length, at);
  out.set(r, at);
  at += r.length;
  at = out.writeUInt32BE(n.length, at);
  out.set(n, at);
  return out;
}

/** The connecting side's answer to a challenge. */
export function proveToken(token: string, nonce: Uint8Array, role: string, name: string): Uint8Array {
  return new Uint8Array(createHmac('sha256', token).update(macInput(nonce, role, name)).digest());
}

/**
 * Whether `proof` shows knowledge of `token` for this nonce, role and name. Lengths are
 * public (fixed), so checking them first leaks nothing; the bytes compare in constant time.
 */
export function verifyProof(token: string, nonce: Uint8Array, role: string, name: string, proof: Uint8Array): boolean {
  if (nonce.byteLength !== NONCE_BYTES) return false;
  if (!(proof instanceof Uint8Array) || proof.byteLength !== PROOF_BYTES) return false;
  const expected = proveToken(token, nonce, role, name);
  return timingSafeEqual(expected, proof);
}

/**
 * The token in a file, trimmed. Refuses an empty file, and on POSIX a file that others
 * may read (mode & 0o004): `chmod 600` it.
 */
export async function readTokenFile(path: string): Promise<string> {
  let text: string;
  try {
    const st = await stat(path);
    if (process.platform !== 'win32' && (st.mode & 0o004) !== 0) {
      throw new AuthError(
        'TOKEN_FILE_INSECURE',
        `token file ${path} is readable by every user (mode ${(st.mode & 0o777).toString(8)}); run: chmod 600 ${path}`,
      );
    }
    text = await readFile(path, 'utf8');
  } catch (err) {
    if (err instanceof AuthError) throw err;
    throw new AuthError('TOKEN_FILE_UNREADABLE', `cannot read token file ${path}: ${(err as Error).message}`, { cause: err });
  }
  const token = text.trim();
  if (token === '') throw new AuthError('TOKEN_FILE_EMPTY', `token file ${path} is empty`);
  return token;
}
