/**
 * Certificates made by the test, with the openssl command line: a CA, a server
 * certificate for 127.0.0.1/localhost signed by it, a client certificate signed by it,
 * and a client certificate signed by a second, unrelated CA.
 */
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

export interface TestPki {
  readonly dir: string;
  readonly caCert: Buffer;
  readonly serverCert: Buffer;
  readonly serverKey: Buffer;
  readonly clientCert: Buffer;
  readonly clientKey: Buffer;
  /** Signed by another CA: a server that requires client certificates refuses it. */
  readonly rogueCert: Buffer;
  readonly rogueKey: Buffer;
  readonly paths: Record<'caCert' | 'serverCert' | 'serverKey' | 'clientCert' | 'clientKey' | 'rogueCert' | 'rogueKey', string>;
  remove(): void;
}

function openssl(dir: string, args: string[]): void {
  execFileSync('openssl', args, { cwd: dir, stdio: ['ignore', 'ignore', 'pipe'] });
}

export function makePki(): TestPki {
  const dir = mkdtempSync(join(tmpdir(), 'weft-pki-'));
  const ca = (name: string): void => {
    openssl(dir, ['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', `${name}.key`, '-out', `${name}.crt`, '-days', '2', '-subj', `/CN=${name}`]);
  };
  const leaf = (name: string, caName: string, ext: string): void => {
    writeFileSync(join(dir, `${name}.ext`), ext);
    openssl(dir, ['req', '-newkey', 'rsa:2048', '-nodes', '-keyout', `${name}.key`, '-out', `${name}.csr`, '-subj', `/CN=${name}`]);
    openssl(dir, [
      'x509', '-req', '-in', `${name}.csr`, '-CA', `${caName}.crt`, '-CAkey', `${caName}.key`, '-CAcreateserial',
      '-out', `${name}.crt`, '-days', '2', '-extfile', `${name}.ext`,
    ]);
  };
  ca('weft-test-ca');
  ca('weft-rogue-ca');
  leaf('server', 'weft-test-ca', 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n');
  leaf('client', 'weft-test-ca', 'extendedKeyUsage=clientAuth\n');
  leaf('rogue', 'weft-rogue-ca', 'extendedKeyUsage=clientAuth\n');
  const p = {
    caCert: join(dir, 'weft-test-ca.crt'),
    serverCert: join(dir, 'server.crt'),
    serverKey: join(dir, 'server.key'),
    clientCert: join(dir, 'client.crt'),
    clientKey: join(dir, 'client.key'),
    rogueCert: join(dir, 'rogue.crt'),
    rogueKey: join(dir, 'rogue.key'),
  };
  return {
    dir,
    caCert: readFileSync(p.caCert),
    serverCert: readFileSync(p.serverCert),
    serverKey: readFileSync(p.serverKey),
    clientCert: readFileSync(p.clientCert),
    clientKey: readFileSync(p.clientKey),
    rogueCert: readFileSync(p.rogueCert),
    rogueKey: readFileSync(p.rogueKey),
    paths: p,
    remove: () => rmSync(dir, { recursive: true, force: true }),
  };
}
