/**
 * A static execution order that keeps few results alive at once.
 *
 * In the spirit of `dask.order`: finish a chain or a subtree before opening a new branch.
 * We walk depth-first from each terminal node (in declaration order) into its
 * dependencies and number nodes in post-order, so a node is numbered right after the
 * last of its inputs, and the inputs of one reduction are produced together. For a
 * binary tree reduction this yields leaves 0, 1, their parent, leaves 2, 3, their parent,
 * their grandparent, ... — O(depth) live results instead of O(width).
 *
 * Input: a CSR of dependencies (deps of node i are depIdx[depPtr[i] .. depPtr[i+1])) and
 * whether each node has dependents. Iterative (no recursion): chains of any length.
 * `out` (length >= n) receives the order when given (the core writes straight into its
 * per-task array), else a new array is returned.
 */
export function staticOrder(
  n: number,
  depPtr: Int32Array,
  depIdx: Int32Array,
  hasDependents: Uint8Array,
  out?: Float64Array,
): Float64Array {
  const order = out ?? new Float64Array(n);
  if (depPtr[n] === 0) {
    // No edges: every node is its own terminal, numbered in declaration order.
    for (let i = 0; i < n; i++) order[i] = i;
    return order;
  }
  // 0 = not reached, 1 = on the stack, 2 = numbered. A byte per node, and no closure:
  // this runs once per flow run over up to millions of nodes, mostly before the JIT warms.
  const mark = new Uint8Array(n);
  // Next dependency to look at, per node: starts at the node's own slice of depIdx.
  const cursor = depPtr.slice(0, n);
  const stack = new Int32Array(n);
  let next = 0;
  // Pass 0 starts from the terminal nodes (in declaration order); pass 1 from anything
  // left, which sits on a cycle (validation rejects those) or is otherwise unreachable.
  for (let pass = 0; pass < 2; pass++) {
    for (let root = 0; root < n; root++) {
      if (mark[root] !== 0 || (pass === 0 && hasDependents[root] !== 0)) continue;
      let sp = 0;
      stack[sp++] = root;
      mark[root] = 1;
      while (sp > 0) {
        const v = stack[sp - 1]!;
        const end = depPtr[v + 1]!;
        let c = cursor[v]!;
        while (c < end && mark[depIdx[c]!] !== 0) c++;
        if (c < end) {
          const d = depIdx[c]!;
          cursor[v] = c + 1;
          mark[d] = 1;
          stack[sp++] = d;
        } else {
          cursor[v] = c;
          order[v] = next++;
          mark[v] = 2;
          sp--;
        }
      }
    }
  }
  return order;
}
