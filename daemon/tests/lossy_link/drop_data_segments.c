// A tc (clsact) program for the lossy-link test: drops about DROP_PERCENT percent of the IPv4
// TCP segments that carry data, in whichever direction it is attached; everything else passes.
// TCP then retransmits, and the capture must stay exact. Built by the test with clang.
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

static __u32 (*bpf_get_prandom_u32)(void) = (void *)BPF_FUNC_get_prandom_u32;
static long (*bpf_skb_load_bytes)(const void *skb, __u32 offset, void *to, __u32 len) =
    (void *)BPF_FUNC_skb_load_bytes;

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
    if (__builtin_bswap16(ip.tot_len) <= headers)
        return TC_ACT_OK;
    return bpf_get_prandom_u32() % 100 < DROP_PERCENT ? TC_ACT_SHOT : TC_ACT_OK;
}

char LICENSE[] SEC("license") = "GPL";
