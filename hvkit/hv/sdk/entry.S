/* hvkit guest entry stub. The hypervisor starts every vCPU here in long mode with
 * rdi = the boot info, rsi = the vCPU index, rsp = that vCPU's stack top (16-aligned).
 * It calls hv_main(boot, vcpu) and passes its return value to the HV_EXIT hypercall. */
    .section .text.entry, "ax"
    .globl _start
_start:
    xor %ebp, %ebp
    mov %rdi, hv_boot(%rip)
    call hv_main
    mov %eax, %edi
    mov $0, %eax            /* HV_EXIT */
    mov $0x500, %dx         /* HV_PORT_HYPERCALL */
    outl %eax, %dx
1:  hlt
    jmp 1b

    .section .bss
    .balign 8
    .globl hv_boot
hv_boot:
    .quad 0
