// SPDX-License-Identifier: GPL-2.0
/*
 * fsmoke: a RAM-backed frontswap backend to smoke-test the frontswap
 * patches (guest-driver/patches) without a vtmem device. Pages are kept
 * in one xarray per swap area, keyed by slot offset.
 *
 * Parameters: refuse_every=N refuses every Nth store (0: never), to
 * exercise the fallback to the swap device; exclusive=1 drops pages on
 * load (FRONTSWAP_LOAD_DROPPED).
 */
#include <linux/frontswap.h>
#include <linux/highmem.h>
#include <linux/module.h>
#include <linux/swap.h>
#include <linux/xarray.h>

static unsigned int refuse_every;
module_param(refuse_every, uint, 0444);
static bool exclusive;
module_param(exclusive, bool, 0444);

static struct xarray fsmoke_areas[MAX_SWAPFILES];
static atomic_t fsmoke_stores = ATOMIC_INIT(0);

static void fsmoke_free_area(unsigned int type)
{
	unsigned long index;
	struct page *page;

	xa_for_each(&fsmoke_areas[type], index, page) {
		xa_erase(&fsmoke_areas[type], index);
		__free_page(page);
	}
}

static void fsmoke_init(unsigned int type, unsigned long nr_pages)
{
	pr_info("fsmoke: init type %u, %lu pages\n", type, nr_pages);
}

static int fsmoke_store(unsigned int type, pgoff_t offset, struct page *page)
{
	struct page *copy, *old;

	if (refuse_every && atomic_inc_return(&fsmoke_stores) % refuse_every == 0)
		return -ENOSPC;

	copy = alloc_page(GFP_NOIO | __GFP_NOWARN);
	if (!copy)
		return -ENOMEM;
	copy_highpage(copy, page);
	old = xa_store(&fsmoke_areas[type], offset, copy, GFP_NOIO | __GFP_NOWARN);
	if (xa_is_err(old)) {
		__free_page(copy);
		return xa_err(old);
	}
	if (old)
		__free_page(old);
	return 0;
}

static int fsmoke_load(unsigned int type, pgoff_t offset, struct page *page)
{
	struct page *copy;

	if (exclusive) {
		copy = xa_erase(&fsmoke_areas[type], offset);
		if (!copy)
			return -ENOENT;
		copy_highpage(page, copy);
		__free_page(copy);
		return FRONTSWAP_LOAD_DROPPED;
	}
	copy = xa_load(&fsmoke_areas[type], offset);
	if (!copy)
		return -ENOENT;
	copy_highpage(page, copy);
	return 0;
}

static void fsmoke_invalidate_page(unsigned int type, pgoff_t offset)
{
	struct page *copy = xa_erase(&fsmoke_areas[type], offset);

	if (copy)
		__free_page(copy);
}

static void fsmoke_invalidate_area(unsigned int type)
{
	pr_info("fsmoke: invalidate area %u\n", type);
	fsmoke_free_area(type);
}

static const struct frontswap_ops fsmoke_ops = {
	.init = fsmoke_init,
	.store = fsmoke_store,
	.load = fsmoke_load,
	.invalidate_page = fsmoke_invalidate_page,
	.invalidate_area = fsmoke_invalidate_area,
	.owner = THIS_MODULE,
};

static int __init fsmoke_mod_init(void)
{
	unsigned int i;
	int ret;

	for (i = 0; i < MAX_SWAPFILES; i++)
		xa_init(&fsmoke_areas[i]);
	ret = frontswap_register_ops(&fsmoke_ops);
	pr_info("fsmoke: register: %d\n", ret);
	if (ret)
		return ret;
	/* A second backend must be refused. */
	ret = frontswap_register_ops(&fsmoke_ops);
	pr_info("fsmoke: second register: %d\n", ret);
	return 0;
}

static void __exit fsmoke_mod_exit(void)
{
	unsigned int i;
	int ret = frontswap_unregister_ops(&fsmoke_ops);

	pr_info("fsmoke: unregister: %d\n", ret);
	for (i = 0; i < MAX_SWAPFILES; i++)
		fsmoke_free_area(i);
}

module_init(fsmoke_mod_init);
module_exit(fsmoke_mod_exit);
MODULE_DESCRIPTION("RAM-backed frontswap backend for smoke tests");
MODULE_LICENSE("GPL");
