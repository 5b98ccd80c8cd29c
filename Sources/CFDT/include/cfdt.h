// libfdt (Debian's libfdt-dev, linked statically) for the machine's flattened device tree
// (Machine/FlattenedDeviceTree.swift): the sequential-write calls that build a DTB, and the
// read-only calls that walk one (to check a blob and for tests). Thin wrappers, so that Swift sees
// plain functions (libfdt has macros and inline functions) and one place names what we use.
//
// Every int-returning function returns 0 or a non-negative offset on success and a negative
// -FDT_ERR_* code on failure (cfdt_strerror names it). No function allocates; none keeps a pointer
// past its return.
#pragma once
#include <stddef.h>
#include <stdint.h>

// -FDT_ERR_NOSPACE: the buffer given to cfdt_create is too small for what was added (start again
// with a larger one).
extern const int cfdt_err_nospace;

// --- Writing (sequential): create, finish_reservemap, then begin_node/property/end_node nested
// as the tree is, and finish. The buffer holds the blob being built; after cfdt_finish it is a
// complete DTB of cfdt_totalsize bytes at its start.

// fdt_create: starts a tree in `buf` (`size` bytes).
int cfdt_create(void *buf, int size);
// fdt_finish_reservemap: ends the (empty) memory reservation map; before the first node.
int cfdt_finish_reservemap(void *fdt);
// fdt_begin_node: opens a node named `name` (with its unit address; "" for the root).
int cfdt_begin_node(void *fdt, const char *name);
// fdt_property: adds property `name` with `length` bytes of `value` to the open node.
int cfdt_property(void *fdt, const char *name, const void *value, int length);
// fdt_end_node: closes the innermost open node.
int cfdt_end_node(void *fdt);
// fdt_finish: closes the tree (string block, header sizes); the blob is then complete.
int cfdt_finish(void *fdt);

// --- Reading.

// fdt_totalsize: the blob's length from its header (check it first with cfdt_check).
uint32_t cfdt_totalsize(const void *fdt);
// fdt_check_full: checks the header and the whole structure block of the blob in `size` bytes
// (nesting, names, property offsets, strings): 0 when it is sound.
int cfdt_check(const void *fdt, size_t size);
// fdt_first_subnode / fdt_next_subnode: the offset of the first child of `node` / of the sibling
// after `node`; -FDT_ERR_NOTFOUND when there is none.
int cfdt_first_subnode(const void *fdt, int node);
int cfdt_next_subnode(const void *fdt, int node);
// fdt_get_name: the node's name with its unit address (NUL-terminated, inside the blob); *length
// its length, or the error code with NULL.
const char *cfdt_get_name(const void *fdt, int node, int *length);
// fdt_first_property_offset / fdt_next_property_offset: the offset of a node's first property /
// of the property after `property`; -FDT_ERR_NOTFOUND when there is none.
int cfdt_first_property(const void *fdt, int node);
int cfdt_next_property(const void *fdt, int property);
// fdt_getprop_by_offset: the value of the property at `property` (inside the blob), its name in
// *name and its length in *length; NULL with the error code in *length.
const void *cfdt_property_at(const void *fdt, int property, const char **name, int *length);
// fdt_num_mem_rsv: how many memory reservation entries the blob has (0 for ours).
int cfdt_reservation_count(const void *fdt);

// fdt_strerror: a static description of a -FDT_ERR_* code.
const char *cfdt_strerror(int error);
