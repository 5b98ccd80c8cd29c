// See include/cfdt.h.
#include <libfdt.h>

#include "cfdt.h"

const int cfdt_err_nospace = -FDT_ERR_NOSPACE;

int cfdt_create(void *buf, int size) { return fdt_create(buf, size); }
int cfdt_finish_reservemap(void *fdt) { return fdt_finish_reservemap(fdt); }
int cfdt_begin_node(void *fdt, const char *name) { return fdt_begin_node(fdt, name); }
int cfdt_property(void *fdt, const char *name, const void *value, int length) { return fdt_property(fdt, name, value, length); }
int cfdt_end_node(void *fdt) { return fdt_end_node(fdt); }
int cfdt_finish(void *fdt) { return fdt_finish(fdt); }

uint32_t cfdt_totalsize(const void *fdt) { return fdt_totalsize(fdt); }
int cfdt_check(const void *fdt, size_t size) { return fdt_check_full(fdt, size); }
int cfdt_first_subnode(const void *fdt, int node) { return fdt_first_subnode(fdt, node); }
int cfdt_next_subnode(const void *fdt, int node) { return fdt_next_subnode(fdt, node); }
const char *cfdt_get_name(const void *fdt, int node, int *length) { return fdt_get_name(fdt, node, length); }
int cfdt_first_property(const void *fdt, int node) { return fdt_first_property_offset(fdt, node); }
int cfdt_next_property(const void *fdt, int property) { return fdt_next_property_offset(fdt, property); }
const void *cfdt_property_at(const void *fdt, int property, const char **name, int *length) {
    return fdt_getprop_by_offset(fdt, property, name, length);
}
int cfdt_reservation_count(const void *fdt) { return fdt_num_mem_rsv(fdt); }

const char *cfdt_strerror(int error) { return fdt_strerror(error); }
