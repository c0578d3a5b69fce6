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
 */
export function staticOrder(n: number, depPtr: Int32Array, depIdx: Int32Array, hasDependents: Uint8Array): Float64Array {
  const order = new Float64Array(n).fill(-1);
  // Next dependency to look at, per node: starts at the node's own slice of depIdx.
  const cursor = depPtr.slice(0, n);
  const stack = new Int32Array(n);
  let next = 0;
  const visit = (root: number): void => {
    if (order[root]! >= 0) return;
    let sp = 0;
    stack[sp++] = root;
    order[root] = -2; // on the stack
    while (sp > 0) {
      const v = stack[sp - 1]!;
      const end = depPtr[v + 1]!;
      let c = cursor[v]!;
      let pushed = false;
      while (c < end) {
        const d = depIdx[c++]!;
        if (order[d] === -1) {
          cursor[v] = c;
          order[d] = -2;
          stack[sp++] = d;
          pushed = true;
          break;
        }
      }
      if (!pushed) {
        cursor[v] = c;
        order[v] = next++;
        sp--;
      }
    }
  };
  for (let i = 0; i < n; i++) if (hasDependents[i] === 0) visit(i);
  // Anything left sits on a cycle (validation rejects those) or is otherwise unreachable.
  for (let i = 0; i < n; i++) if (order[i]! < 0) visit(i);
  return order;
}
