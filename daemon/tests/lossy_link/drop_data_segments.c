// A tc (clsact) program for the lossy-link tests, built by the test with clang. In whichever
// direction it is attached it drops, of the IPv4 TCP segments that carry data, either about
// DROP_PERCENT percent at random, or (with DROP_REQUEST_HEADS) the first transmission of every
// segment that starts a large request (`*` and at least 1000 bytes): its retransmission passes,
// after the segments behind it. Everything else passes. TCP then retransmits, and the capture
// must stay exact.
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>

#ifndef DROP_PERCENT
#define DROP_PERCENT 2
#endif

#define SEC(name) __attribute__((section(name), used))
#define __uint(name, val) int(*name)[val]
#define __type(name, val) typeof(val) *name

static __u32 (*bpf_get_prandom_u32)(void) = (void *)BPF_FUNC_get_prandom_u32;
static long (*bpf_skb_load_bytes)(const void *skb, __u32 offset, void *to, __u32 len) =
    (void *)BPF_FUNC_skb_load_bytes;
static void *(*bpf_map_lookup_elem)(void *map, const void *key) = (void *)BPF_FUNC_map_lookup_elem;
static long (*bpf_map_update_elem)(void *map, const void *key, const void *value, __u64 flags) =
    (void *)BPF_FUNC_map_update_elem;

/// Request heads dropped once: source address, source port and sequence number.
struct segment {
    __u32 saddr;
    __u32 seq;
    __u16 sport;
    __u16 pad;
};

struct {
    __uint(type, BPF_MAP_TYPE_LRU_HASH);
    __uint(max_entries, 65536);
    __type(key, struct segment);
    __type(value, __u8);
} dropped SEC(".maps");

SEC("tc")
int drop_data_segments(struct __sk_buff *skb)
{
    struct iphdr ip;
    struct tcphdr tcp;

    if (skb->protocol != __builtin_bswap16(ETH_P_IP))
        return TC_ACT_OK;
    if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)))
        return TC_ACT_OK;
    if (ip.protocol != IPPROTO_TCP)
        return TC_ACT_OK;
    __u32 ip_len = ip.ihl * 4;
    if (bpf_skb_load_bytes(skb, ETH_HLEN + ip_len, &tcp, sizeof(tcp)))
        return TC_ACT_OK;
    __u32 headers = ip_len + tcp.doff * 4;
    __u32 total = __builtin_bswap16(ip.tot_len);
    if (total <= headers)
        return TC_ACT_OK;
#ifdef DROP_REQUEST_HEADS
    char first;
    if (total - headers < 1000 || bpf_skb_load_bytes(skb, ETH_HLEN + headers, &first, 1) ||
        first != '*')
        return TC_ACT_OK;
    struct segment key = {.saddr = ip.saddr, .seq = tcp.seq, .sport = tcp.source};
    if (bpf_map_lookup_elem(&dropped, &key))
        return TC_ACT_OK;
    __u8 one = 1;
    bpf_map_update_elem(&dropped, &key, &one, BPF_ANY);
    return TC_ACT_SHOT;
#else
    return bpf_get_prandom_u32() % 100 < DROP_PERCENT ? TC_ACT_SHOT : TC_ACT_OK;
#endif
}

char LICENSE[] SEC("license") = "GPL";
