// SPDX-License-Identifier: GPL-2.0
/*
 * memtest MIB [ROUNDS [hold]]: fill MIB MiB with a pattern that depends on
 * the page index and the round, then check every page; repeat ROUNDS
 * times. Exits 1 on the first mismatch. Sized above guest RAM it forces
 * pages through swap. With "hold", it then waits for SIGUSR1 and checks
 * the last round's data once more before exiting.
 */
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define PAGE 4096UL

static volatile sig_atomic_t released;

static void on_usr1(int sig)
{
	(void)sig;
	released = 1;
}

static uint64_t pattern(size_t p, unsigned int r)
{
	/* Every 8th page stays zero-filled (swap's zero map). */
	return (p % 8 == 7) ? 0 : (p * 0x9E3779B97F4A7C15ULL) ^ r;
}

static int check(const uint64_t *mem, size_t pages, unsigned int r)
{
	for (size_t p = 0; p < pages; p++) {
		const uint64_t *w = mem + p * (PAGE / 8);
		uint64_t v = pattern(p, r);

		for (size_t i = 0; i < PAGE / 8; i++) {
			if (w[i] != (v ? v + i : 0)) {
				printf("memtest: MISMATCH round %u page %zu word %zu\n",
				       r, p, i);
				return 1;
			}
		}
	}
	return 0;
}

int main(int argc, char **argv)
{
	size_t mib = argc > 1 ? strtoul(argv[1], NULL, 0) : 64;
	unsigned int rounds = argc > 2 ? strtoul(argv[2], NULL, 0) : 2;
	int hold = argc > 3 && !strcmp(argv[3], "hold");
	size_t pages = mib * 1024 * 1024 / PAGE;
	uint64_t *mem = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE,
			     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	if (mem == MAP_FAILED) {
		perror("mmap");
		return 2;
	}
	signal(SIGUSR1, on_usr1);
	for (unsigned int r = 0; r < rounds; r++) {
		for (size_t p = 0; p < pages; p++) {
			uint64_t *w = mem + p * (PAGE / 8);
			uint64_t v = pattern(p, r);

			for (size_t i = 0; i < PAGE / 8; i++)
				w[i] = v ? v + i : 0;
		}
		if (check(mem, pages, r))
			return 1;
		printf("memtest: round %u ok (%zu MiB)\n", r, mib);
		fflush(stdout);
	}
	if (hold && rounds) {
		printf("memtest: holding\n");
		fflush(stdout);
		while (!released)
			pause();
		if (check(mem, pages, rounds - 1))
			return 1;
		printf("memtest: held data ok\n");
	}
	return 0;
}
